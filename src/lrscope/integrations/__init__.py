"""Hooks and callbacks that attach lrscope to training loops (Keras, Lightning, ...)."""
