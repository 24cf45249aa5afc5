"""Vision inputs: image decoding and safe fetching (images.py, fetch.py), the image processors
(processors.py, pure numpy + Pillow), the prompt's image rows (prompt.py), and the shared vision
towers (clip.py: torch, imported only by the vision model files)."""
