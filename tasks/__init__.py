"""What is learned: one package per Task, and the encoders they share.

  encoders/        BERT built from a config; HF / TF1 / TF2 / TF Hub weights; WordPiece tokenization; conversion
  classification/  sentence(-pair) classification (SST-2, any TSV)
  squad/           extractive span QA (SQuAD v1.1 files)
  ner/             CoNLL named-entity tagging with a CRF or softmax head
  registry.py      task names and their launch flags -> built Task objects
  options.py       the options every Task config shares (encoder, vocab, casing, sequence length, seed)
  serving.py       what every serving export shares: the tf.Module, tie-safe argmax, character offsets
  textfiles.py     reading text as people have it (BOM, CRLF, gs://), located input errors, the data folder

Imports go launch -> tasks -> engine, never back, and no module imports one that imports it
(tests/test_layout.py checks both).
"""
import engine  # noqa: F401  (TensorFlow's environment, set before it loads: engine/__init__.py)
