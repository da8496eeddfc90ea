"""Make tiny, randomly initialised stand-ins for every model txt2img loads (smoke mode).

Runs INSIDE the target environment (Python 3.8, torch 1.10/1.11, transformers 4.19.2),
because pickled models must be written by the same torch/transformers that read them.
It uses the same classes as upstream's `configs/stable-diffusion/v1-inference.yaml`
(LatentDiffusion, UNetModel, AutoencoderKL with f=8, FrozenCLIPEmbedder's CLIPTextModel,
diffusers' StableDiffusionSafetyChecker) with tiny dimensions, so the real upstream
txt2img.py runs end to end in seconds without the 4 GB checkpoint.

Usage (PYTHONPATH must reach upstream's `ldm` package):
    python make_tiny_models.py --source UPSTREAM --out SMOKE_DIR [--seed 0]

Writes, under SMOKE_DIR:
    v1-inference-smoke.yaml                       the config to pass as txt2img --config
    models/ldm/stable-diffusion-v1/model.ckpt     the checkpoint (txt2img --ckpt)
    models/clip-vit-large-patch14/                tiny CLIP text model + byte-level BPE tokenizer
    models/stable-diffusion-safety-checker/       tiny safety checker + preprocessor_config.json
    torch-home/hub/checkpoints/...                a HardNet stand-in, only if kornia loads one at import
and prints one JSON line `SMOKE-ASSETS {...}` describing them. Nothing is downloaded.
"""

import argparse
import json
import os
import sys
import tempfile

import torch

CLIP_DIR = "clip-vit-large-patch14"
SAFETY_DIR = "stable-diffusion-safety-checker"
CKPT = os.path.join("ldm", "stable-diffusion-v1", "model.ckpt")
CONFIG = "v1-inference-smoke.yaml"
HARDNET_FILE = "checkpoint_liberty_with_aug.pth"

CONTEXT_DIM = 32  # CLIP text hidden size == UNet cross-attention context_dim
MAX_TOKENS = 77  # FrozenCLIPEmbedder pads every prompt to 77 tokens
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n"),
          ("a", "t"), ("e", "n"), ("c", "a"), ("ca", "t</w>")]


def tiny_config(source):
    """Upstream's v1 inference config with tiny dimensions (same classes, f=8 kept)."""
    from omegaconf import OmegaConf
    config = OmegaConf.load(os.path.join(source, "configs", "stable-diffusion", "v1-inference.yaml"))
    unet = config.model.params.unet_config.params
    unet.model_channels = 32
    unet.channel_mult = [1, 2]
    unet.attention_resolutions = [2]  # cross-attention on the 16x16 level only: 5x cheaper than 32x32
    unet.num_res_blocks = 1
    unet.num_heads = 2
    unet.context_dim = CONTEXT_DIM
    unet.use_checkpoint = False
    ddconfig = config.model.params.first_stage_config.params.ddconfig
    ddconfig.ch = 32
    ddconfig.ch_mult = [1, 2, 4, 4]  # three downsamplings: f=8, as the real autoencoder
    ddconfig.num_res_blocks = 1
    return config


def write_tokenizer(folder):
    """A minimal byte-level BPE vocabulary in CLIP's layout, saved through CLIPTokenizer."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = os.path.join(scratch, "vocab.json")
        merges_file = os.path.join(scratch, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as handle:
            json.dump({token: index for index, token in enumerate(tokens)}, handle)
        with open(merges_file, "w", encoding="utf-8") as handle:
            handle.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
        tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=MAX_TOKENS)
        tokenizer.save_pretrained(folder)
    return len(tokens)


def write_text_model(folder, vocab_size):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CONTEXT_DIM, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=MAX_TOKENS)
    CLIPTextModel(config).save_pretrained(folder)


def write_safety_checker(folder):
    """Tiny checker whose concept thresholds (2.0) exceed any cosine: it never flags an image."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPFeatureExtractor
    config = CLIPConfig(text_config_dict={"hidden_size": 32, "intermediate_size": 64,
                                          "num_hidden_layers": 1, "num_attention_heads": 2},
                        vision_config_dict={"hidden_size": 32, "intermediate_size": 64,
                                            "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "image_size": 224, "patch_size": 32},
                        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(folder)
    CLIPFeatureExtractor(size=224, crop_size=224).save_pretrained(folder)


def fill_zero_outputs(unet, std=0.05):
    """LDM zero-initialises output convolutions (zero_module); a fresh model would then
    predict zero noise and ignore the prompt. Give every all-zero weight small noise."""
    filled = 0
    with torch.no_grad():
        for _, param in unet.named_parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(0.0, std)
                filled += 1
    return filled


def write_checkpoint(config, clip_folder, path):
    """Instantiate the whole LatentDiffusion (its text encoder read from `clip_folder`)."""
    from ldm.util import instantiate_from_config
    config.model.params.cond_stage_config.params = {"version": clip_folder}
    model = instantiate_from_config(config.model)
    filled = fill_zero_outputs(model.model.diffusion_model)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, path)
    return filled, sum(p.numel() for p in model.parameters())


class _HubCalled(Exception):
    pass


def write_hardnet_standin(torch_home):
    """kornia 0.6.0 builds HardNet(pretrained=True) while importing kornia.feature
    (kornia issue 1422), so `import kornia` needs its checkpoint in $TORCH_HOME even though
    txt2img never uses it. Write random HardNet weights there, only if kornia asks."""
    import torch.hub
    real = torch.hub.load_state_dict_from_url

    def refuse(*args, **kwargs):
        raise _HubCalled()

    torch.hub.load_state_dict_from_url = refuse
    try:
        import kornia  # noqa: F401
        return None
    except _HubCalled:
        pass
    finally:
        torch.hub.load_state_dict_from_url = real
    hardnet = sys.modules["kornia.feature.hardnet"].HardNet(pretrained=False)
    path = os.path.join(torch_home, "hub", "checkpoints", HARDNET_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": hardnet.state_dict()}, path)
    for name in [n for n in sys.modules if n == "kornia" or n.startswith("kornia.")]:
        del sys.modules[name]  # the half-imported kornia must not be reused
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="upstream checkout")
    parser.add_argument("--out", required=True, help="smoke folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    models = os.path.join(args.out, "models")
    clip_folder = os.path.join(models, CLIP_DIR)
    hardnet = write_hardnet_standin(os.path.join(args.out, "torch-home"))
    vocab_size = write_tokenizer(clip_folder)
    write_text_model(clip_folder, vocab_size)
    write_safety_checker(os.path.join(models, SAFETY_DIR))
    config = tiny_config(args.source)
    from omegaconf import OmegaConf
    OmegaConf.save(config, os.path.join(args.out, CONFIG))
    ckpt = os.path.join(models, CKPT)
    filled, parameters = write_checkpoint(config, clip_folder, ckpt)
    print("SMOKE-ASSETS " + json.dumps({
        "config": CONFIG, "ckpt": os.path.join("models", CKPT), "models_dir": "models",
        "hardnet_standin": hardnet and os.path.relpath(hardnet, args.out),
        "unet_zero_weights_filled": filled, "parameters": parameters,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
    }, sort_keys=True))


if __name__ == "__main__":
    main()
