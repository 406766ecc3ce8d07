"""TEXT_TO_IMAGE: adapters on Stable Diffusion's components (diffusers; `pip install peftrun[diffusion]`).

    components.py  the pipeline's modules (UNet, CLIP text encoder, VAE, noise scheduler) from a diffusers
                   pipeline folder or the bundled SD v1-4 configs, held by one nn.Module (`Components`)
    adapted.py     DiffusionPeftModel: one adapter name across the UNet and (optionally) the text encoder,
                   each with its own method config; saved as peft's DreamBooth example saves them, one folder
                   per component (output_dir/unet/, output_dir/text_encoder/) in peft's keys
    images.py      sampling images with adapters (weighted, several at once), class images for prior
                   preservation, and merging into a whole pipeline folder

The DreamBooth objective itself is peftrun/training/objectives/diffusion.py: it goes through the same loop,
checkpoints and resume as every other objective.
"""

ADAPTED_COMPONENTS = ("unet", "text_encoder")
