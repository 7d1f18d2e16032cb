"""Encoders shared by every Task: building BERT, loading pretrained weights, tokenization, conversion.

  bert.py          BertConfig, Model Garden's BertEncoderV2 built from it, HF safetensors / TF1 / TF2 weights
  hub.py           TF Hub encoders and preprocessors: loading handles, exporting our own in Hub format
  tokenization.py  WordPiece with tensorflow-text, ids identical to Hugging Face's tokenizer
  loading.py       `make_encoder(init)`, what Tasks call: picks the source (config, folder, Hub handle) from `init`
  convert.py       pretrained weights of any source written as one TF2 checkpoint folder

This __init__ imports nothing, so a module here importing a sibling never runs code that imports it back.
"""
