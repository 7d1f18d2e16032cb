"""Sentence (and sentence-pair) classification: SST-2 and any labelled TSV.

  config.py   ClassificationConfig: the options, their help and launch flags (light: no TensorFlow)
  task.py     TSV reading, tokenization and length-grouped batches, the pooled-encoder head, loss, accuracy/F1,
              host-side `predict`
  serving.py  the raw-string serving signature (sentence -> label, label_id, probabilities)
"""
