"""LESS in Hugging Face transformers: models, the "less" attention function, the cache (`LessLayer`, `LessCache`),
the user-facing press (`LessPress`, `apply`) and text data."""
