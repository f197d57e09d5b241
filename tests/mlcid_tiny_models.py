"""Tiny random-weight models of the MLCID builder's real classes, built offline and saved to disk.

Each ``save_*`` builds a model of the same transformers/diffusers class as the real checkpoint
(BLIP, OWLv2, SAM, DPT, SD inpainting) from a hand-written config with hidden sizes of 8-32, with
a processor/tokenizer made from a small in-memory vocabulary, and saves both with
``save_pretrained`` so that tests load them through the builder's own loaders. Weights are random
after a fixed seed, except where noted, so outputs are meaningless but shaped exactly like the real
ones. Following diffusers' tests, everything runs in well under a second per call.
"""

from __future__ import annotations

from pathlib import Path

import torch

CAPTION_WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] a an the photo of man woman cat dog cup coffee table red blue green "
    "small big on in with and sitting standing next to rocket flag helmet grass sky tree ."
).split()


def _char_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (no merges): every lowercase word still tokenizes."""
    vocab: dict[str, int] = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _clip_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_char_vocab(), merges=[], model_max_length=max_length)


def save_blip(path: Path) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(CAPTION_WORDS)}
    tokenizer = BertTokenizer(vocab=vocab)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32,
                         bos_token_id=vocab["[CLS]"], sep_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"]),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_owlv2(path: Path) -> Path:
    """OWLv2 whose box head outputs zero, so boxes are exactly the patch-grid prior (random weights
    give degenerate boxes), and whose logit scale/shift are scaled down, so scores vary around 0.5
    instead of saturating at 1."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(16)
    n = len(tokenizer.get_vocab())
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer)
    config = Owlv2Config(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=64, patch_size=16),
        projection_dim=32,
    )
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
        for layer in (model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.mul_(0.02)
            layer.bias.zero_()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_grounding_dino(path: Path) -> Path:
    """Grounding DINO (Swin backbone, BERT text encoder) with a word-level BERT vocabulary; its box
    head outputs zero (boxes are the decoder's reference points) and its scores stay near 0.5."""
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + [w for w in CAPTION_WORDS if not w.startswith("[")]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}), tokenizer=tokenizer)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                   window_size=4, out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, num_queries=12, num_feature_levels=2, encoder_n_points=2, decoder_n_points=2,
        max_text_len=32, use_timm_backbone=False, backbone=None, use_pretrained_backbone=False,
    )
    model = GroundingDinoForObjectDetection(config).eval()
    with torch.no_grad():
        for head in model.bbox_embed:
            head.layers[-1].weight.zero_()
            head.layers[-1].bias.zero_()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_sam(path: Path) -> Path:
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(0)
    image_processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
    config = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                           patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=37, num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16),
    )
    SamModel(config).eval().save_pretrained(path)
    SamProcessor(image_processor=image_processor).save_pretrained(path)
    return path


def save_dpt(path: Path) -> Path:
    """DPT with a larger init range: the default init predicts an all-zero depth map."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
                       patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 16, 16],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], initializer_range=0.2)
    DPTForDepthEstimation(config).eval().save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(path)
    return path


def save_sd_inpaint(path: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(16)
    n = len(tokenizer.get_vocab())
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=n, hidden_size=16, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def save_all(root: Path) -> dict[str, Path]:
    """Every tiny model under ``root``: {"captioner", "detector", "segmenter", "depth", "inpainter"}."""
    root = Path(root)
    return {
        "captioner": save_blip(root / "blip"),
        "detector": save_owlv2(root / "owlv2"),
        "segmenter": save_sam(root / "sam"),
        "depth": save_dpt(root / "dpt"),
        "inpainter": save_sd_inpaint(root / "sd-inpaint"),
    }
