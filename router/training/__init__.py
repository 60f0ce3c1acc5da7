"""Training the learned complexity classifier: public prompts, labels, fitting, export.

Needs the cloud extra (torch, transformers) plus llama-cpp-python; the edge only
needs `router.classifier` (onnxruntime). `tandem router train` runs it all.
"""
