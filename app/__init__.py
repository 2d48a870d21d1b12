"""LocalAI backend: local image generation with first-class LoRA support."""

import os

# transformers prints optional-dependency hints (torchvision) while being imported; set
# its verbosity before anything imports it.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
