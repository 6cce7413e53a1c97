"""The frozen export: format (config.json + model.safetensors + model card), atomic files,
the Hub, and the ``save_pretrained``/``from_pretrained`` mixin."""
