"""Pretrained encoders by name (``encoders.registry``): an image CNN and a BERT-family text model."""
