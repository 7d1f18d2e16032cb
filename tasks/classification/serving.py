"""Classification's serving signature: sentence (+ sentence_b) -> label, label_id, probabilities."""
from __future__ import annotations

import tensorflow as tf
import tf_keras

from tasks import serving


class ClassificationServing(serving.ServingModule):
    """sentence (+ sentence_b) -> label, label_id, probabilities, as ClassificationTask.predict."""

    def __init__(self, task, model: tf_keras.Model):
        tokenizer = task.tokenizer
        super().__init__(model, tokenizer, name="classification_serving")
        config = task.config
        names = tf.constant(list(config.answer_labels))
        text = tf.TensorSpec([None], tf.string)

        # Padded to the batch's longest sentence, not max_seq_length: the same answers, less work (unless the
        # task keeps one static shape: a model built for TPU, or cut_eval_batches=False).
        pad_to_multiple = task.predict_pad_to_multiple

        def outputs(*texts):
            logits = self.model(tokenizer.encode(*texts, pad_to_multiple=pad_to_multiple), training=False)
            probabilities = task.probabilities(logits)
            label_id = serving.first_argmax(probabilities)
            return {"label": tf.gather(names, label_id), "label_id": label_id, "probabilities": probabilities}

        if len(config.text_columns) == 1:
            self.serve = tf.function(lambda sentence: outputs(sentence), input_signature=[text],
                                     autograph=task.autograph)
        else:
            self.serve = tf.function(lambda sentence, sentence_b: outputs(sentence, sentence_b),
                                     input_signature=[text, text], autograph=task.autograph)
