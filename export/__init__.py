"""Export: trained classifier → fully-convolutional ONNX model, verified, optionally int8, with a
model card, into BentoML's model store. See `python -m export --help`."""
