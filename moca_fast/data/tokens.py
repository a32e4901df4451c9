"""Qwen2.5-VL special tokens and the image placeholder, shared by the processor, datasets and prompts."""

PAD_TOKEN = "<|endoftext|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
MASK_TOKEN = "<|mask|>"  # added by MoCa for masked-language modelling

# What a text carries at each image; the processor expands the pad to one token per merged patch.
IMAGE_PLACEHOLDER = VISION_START_TOKEN + IMAGE_PAD_TOKEN + VISION_END_TOKEN
