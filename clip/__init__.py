"""CLIP's tokenizer and text encoder: the text tower of Stable Diffusion v1 (openai/clip-vit-large-patch14).

    tokenizer.py    prompts -> (B, 77) ids: transformers' CLIPTokenizer, built on the tokenizers library
    text_model.py   ids -> hidden states: embeddings, 12 pre-norm causal blocks, final LayerNorm
    weights.py      key mapping and strict loading of SD v1 folders, SD v1 single files, CLIPModel files
    __main__.py     `python -m clip "a prompt"` prints ids and token strings
"""
from clip.text_model import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from clip.tokenizer import CLIPTokenizer, TokenizerFileError
from clip.weights import config_from_state_dict, load_text_encoder, text_encoder_state_dict

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "CLIPTokenizer", "TokenizerFileError",
           "config_from_state_dict", "load_text_encoder", "text_encoder_state_dict"]
