"""Extractive question answering on SQuAD v1.1-format files.

  config.py   SquadConfig: the options, their help and launch flags (light: no TensorFlow)
  data.py     reading SQuAD JSON, offset-keeping tokenization, doc_stride windows, answer positions
  cache.py    the features as a TFRecord + JSON, keyed by the file, vocab, settings and code
  task.py     the span head and loss, evaluation (decoding.py over each window's logits), `predict`
  decoding.py the span choice (max context, n-best, fallback) in TensorFlow: evaluation, predict, serving
  metrics.py  EM and F1 exactly as the official evaluate-v1.1.py
  serving.py  question, context -> answer in the graph: tokenization and windows, then decoding.py
"""
