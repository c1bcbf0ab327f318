"""The HTTP service (BentoML on onnxruntime). It never imports torch, models/ or export/."""
