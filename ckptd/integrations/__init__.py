"""ckptd for training frameworks: what a PyTorch Lightning or Hugging Face Trainer user adds to a run.

``ckptd.integrations.lightning`` (needs ``lightning``; ``pip install 'ckptd[lightning]'``) and
``ckptd.integrations.transformers`` (needs ``transformers``; ``pip install 'ckptd[transformers]'``) are
imported explicitly; this package imports neither framework.
"""
