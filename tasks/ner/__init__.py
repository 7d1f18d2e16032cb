"""Named-entity recognition on CoNLL-2003-format files, with a linear-chain CRF or a softmax head.

  config.py        TaggingConfig: the options, their help and launch flags (light: no TensorFlow)
  conll.py         reading CoNLL files (IOB1 converted to IOB2), word shapes, word windows, features
  decoding.py      which window owns each word, stitching, entity chunks: TensorFlow, for evaluation,
                   predict and serving alike
  crf.py           the CRF: forward algorithm, Viterbi, IOB2 transition constraints
  task.py          features, the tagging model (first word-piece per word, CRF or softmax), loss, evaluation
  span_metrics.py  the scorer: conlleval.pl's chunk rules and precision/recall/F1, exactly
  serving.py       text -> entities in the graph: word splitting, windows, Viterbi, then decoding.py
"""
