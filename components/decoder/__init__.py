"""Visual decoder: a diffusers UNet conditioned on visual embeddings, the space it denoises in, and sampling."""
