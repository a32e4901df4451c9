"""Qwen2.5-VL special tokens and the image placeholder, shared by the processor, datasets and prompts."""

PAD_TOKEN = "<|endoftext|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
MASK_TOKEN = "<|mask|>"  # added by MoCa for masked-language modelling

# What a text carries at each image; the processor expands the pad to one token per merged patch.
IMAGE_PLACEHOLDER = VISION_START_TOKEN + IMAGE_PAD_TOKEN + VISION_END_TOKEN

# Token ids in the real Qwen2.5-VL vocabulary (Qwen2.5-VL's tokenizer); tiny test vocabularies use their own.
QWEN_PAD_ID = 151643
QWEN_VISION_START_ID = 151652
QWEN_VISION_END_ID = 151653
QWEN_IMAGE_PAD_ID = 151655
