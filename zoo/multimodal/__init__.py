"""Multimodal models: the CLIP/SigLIP dual encoder, the captioner."""
