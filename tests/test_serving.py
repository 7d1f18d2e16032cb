"""Serving exports: briefly trained tiny models exported with launch.export, loaded in a fresh process that
only has TensorFlow + tensorflow-text, answering raw strings exactly as the Tasks' in-process predict."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from absl import app, flags

from conftest import DATA_DIR, REPO_ROOT, write_tiny_encoder_dir
from engine import host
from engine import dense as dense_ops
from engine_helpers import constant_shapes, graph_nodes, run_training
from launch import export as export_launcher
from tasks.ner import conll
from tasks.squad import data as squad_data
from tasks.classification.task import ClassificationConfig, ClassificationTask
from tasks.squad.task import SquadConfig, SquadTask
from tasks.ner.task import TaggingConfig, TaggingTask

TRICKY = ["Café déjà vu, naïve ﬁ ＡＢＣ", "tab\there\x07bell 東京 ΣΑΣ", "", "U.S. O'Neill 1996-08-22 ."]
EXPECTED_SIGNATURES = {
    "sst2": (["sentence"], ["label", "label_id", "probabilities"]),
    "squad": (["context", "question"], ["answer", "end", "score", "start"]),
    "conll_ner": (["text"], ["end", "entity_text", "entity_type", "num_entities", "start"]),
}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A converted-checkpoint folder with a tiny encoder and its own copy of the vocab."""
    return write_tiny_encoder_dir(tmp_path_factory.mktemp("serving_encoder"))


# Toy data a tiny encoder learns in a few updates, so the compared predictions are not all one label / all O.
ADJECTIVES = {"pos": ["good", "great", "wonderful", "brilliant"], "neg": ["bad", "awful", "boring", "terrible"]}
NOUNS = ["movie", "film", "story", "cast", "plot", "ending", "script", "score"]
PEOPLE = [["Peter", "Blackburn"], ["Angela", "Merkel"], ["Boris", "Yeltsin"], ["Nelson", "Mandela"]]
PLACES = [["Paris"], ["New", "York"], ["Brussels"], ["Hong", "Kong"]]
ORGANISATIONS = [["EU"], ["United", "Nations"], ["Reuters"]]


def _toy_sentiment(folder):
    rows = [f"a {adjective} {noun} , truly {ADJECTIVES[label][(i + 1) % 4]}\t{label}"
            for i, adjective in enumerate(ADJECTIVES["pos"] + ADJECTIVES["neg"]) for noun in NOUNS
            for label in ["pos" if adjective in ADJECTIVES["pos"] else "neg"]]
    (folder / "toy.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with open(os.path.join(DATA_DIR, "sst2", "dev.tsv"), encoding="utf-8") as f:
        sst2 = [line.split("\t")[0] for _, line in zip(range(7), f)][1:]
    unseen = [f"the {adjective} {noun} was {adjective}" for adjective, noun in zip(
        ADJECTIVES["pos"] + ADJECTIVES["neg"], reversed(NOUNS))]
    return str(folder / "toy.tsv"), unseen + sst2 + TRICKY


def _tagged(words, tag):
    return [(word, ("B-" if i == 0 else "I-") + tag) for i, word in enumerate(words)]


def _toy_sentence(person, organisation, place):
    return (_tagged(person, "PER") + [("met", "O")] + _tagged(organisation, "ORG")
            + [("officials", "O"), ("in", "O")] + _tagged(place, "LOC") + [("on", "O"), ("Monday", "O"), (".", "O")])


def _toy_conll(folder):
    sentences = [_toy_sentence(p, o, l) for p in PEOPLE for o in ORGANISATIONS for l in PLACES]
    lines = ["-DOCSTART- -X- -X- O", ""]
    for sentence in sentences:
        lines += [f"{word} NNP B-NP {tag}" for word, tag in sentence] + [""]
    (folder / "toy.conll").write_text("\n".join(lines), encoding="utf-8")
    variants = [" ".join(w for w, _ in _toy_sentence(p, o, l)[:-3]) + "." for p, o, l in zip(
        PEOPLE, ORGANISATIONS[::-1] + ORGANISATIONS, PLACES[::-1])]
    real = [" ".join(s.words) for s in conll.read_conll(os.path.join(DATA_DIR, "conll2003", "valid.txt"))[:8]]
    long = " and ".join(" ".join(w for w, _ in _toy_sentence(p, o, l)[:-1]) for p, o, l in zip(
        PEOPLE, ORGANISATIONS, PLACES))  # ~50 words: many windows of 16 sub-tokens
    return str(folder / "toy.conll"), variants + real + [long, "  "] + TRICKY


@pytest.fixture(scope="module")
def trained(encoder_dir, tmp_path_factory):
    """{task: (task, model, model_dir, export flags, raw inputs)} after a few updates of each Task."""
    root = tmp_path_factory.mktemp("serving_runs")
    runs = {}

    train_file, sentences = _toy_sentiment(root)
    task = ClassificationTask(ClassificationConfig(
        data_files={"train": train_file}, encoder=encoder_dir, max_seq_length=32, label_names=("neg", "pos"),
        dropout=0.0))
    trainer = run_training(lambda: task, global_batch_size=16, train_steps=16, steps_per_loop=16,
                           learning_rate=3e-3, model_dir=str(root / "sst2"))
    runs["sst2"] = (task, trainer.model, str(root / "sst2"), ["--max_seq_length=32", "--label_names=neg,pos"],
                    {"sentence": sentences})

    # Windows of 16 sub-tokens: longer sentences are cut into several overlapping windows.
    train_file, texts = _toy_conll(root)
    task = TaggingTask(TaggingConfig(encoder=encoder_dir, data_files={"train": train_file}, max_seq_length=16,
                                     dropout=0.0))
    trainer = run_training(lambda: task, global_batch_size=16, train_steps=30, steps_per_loop=30,
                           learning_rate=1e-2, model_dir=str(root / "conll_ner"))
    # A trained (non-zero) shape embedding, so the export's in-graph word shapes must match predict()'s.
    assert np.abs(trainer.model.case_embedding.embeddings.numpy()).max() > 1e-3
    runs["conll_ner"] = (task, trainer.model, str(root / "conll_ner"), ["--max_seq_length=16"], {"text": texts})
    task = SquadTask(SquadConfig(encoder=encoder_dir, max_seq_length=64, doc_stride=24, max_query_length=16,
                                 max_examples=24, cache_dir=str(root / "squad_cache")))
    trainer = run_training(lambda: task, global_batch_size=16, train_steps=4, steps_per_loop=4,
                           learning_rate=1e-3, model_dir=str(root / "squad"))
    features, _ = task.features("validation")
    examples = features.data.examples[:10]
    questions = [e.question for e in examples] + ["Wer führt das Café?", "What?"]
    contexts = [features.data.contexts[e.context_index] for e in examples] + [
        "Ünal Çelik\u200b führt das Café „Zur Post“ in Köln seit 1999.", "Short."]
    runs["squad"] = (task, trainer.model, str(root / "squad"),
                     ["--max_seq_length=64", "--doc_stride=24", "--max_query_length=16"],
                     {"question": questions, "context": contexts})
    return runs


def export(task_name, checkpoint, export_dir, encoder_dir, *extra):
    """launch.export through its flags, as `python -m launch.export` runs it."""
    flag_values = flags.FlagValues()
    export_launcher.define_flags(flag_values)
    flag_values(["export", f"--task={task_name}", f"--checkpoint={checkpoint}", f"--export_dir={export_dir}",
                 f"--init_encoder={encoder_dir}", *extra])
    return export_launcher.run(flag_values)["serving"]


LOADER = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the in-graph tokenizer's ops)
    results = {}
    for name, (path, inputs) in json.load(open(sys.argv[1], encoding="utf-8")).items():
        serve = tf.saved_model.load(path).signatures["serving_default"]
        outputs = serve(**{k: tf.constant(v) for k, v in inputs.items()})
        results[name] = {k: v.numpy().tolist() for k, v in outputs.items()}
    print(json.dumps(results, default=lambda b: b.decode("utf-8")))
""")


@pytest.fixture(scope="module")
def served(trained, encoder_dir, tmp_path_factory):
    """Exports every task, then, with the encoder folder (and its vocab.txt) moved away, loads the exports in
    a fresh process and lists their signatures with saved_model_cli. Returns (in-process, served, cli)."""
    root = tmp_path_factory.mktemp("serving_exports")
    expected, requests, paths = {}, {}, {}
    for name, (task, model, model_dir, extra, inputs) in trained.items():
        paths[name] = export(name, model_dir, str(root / name), encoder_dir, *extra)
        requests[name] = (paths[name], inputs)
        if name == "sst2":
            labels, probabilities = task.predict(model, inputs["sentence"])
            expected[name] = {"label": labels, "probabilities": probabilities}
        elif name == "squad":
            expected[name] = task.predict(model, inputs["question"], inputs["context"])
        else:
            expected[name] = [[(e.text, e.type, e.start, e.end) for e in entities]
                              for entities in task.predict(model, inputs["text"])]
    (root / "requests.json").write_text(json.dumps(requests), encoding="utf-8")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    moved = encoder_dir + "_moved_away"
    os.rename(encoder_dir, moved)  # the exports must not need the vocab they were made from
    try:
        # The command line's error for a missing checkpoint, run alongside (checked in the bad-input test).
        bad = subprocess.Popen([sys.executable, "-m", "launch.export", "--task=squad", "--checkpoint=/nonexistent/run",
                                f"--export_dir={root}/refused", f"--init_encoder={moved}"], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes = {name: subprocess.Popen([cli, "show", "--dir", path, "--tag_set", "serve", "--signature_def",
                                             "serving_default"], env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True) for name, path in paths.items()}
        loader = subprocess.run([sys.executable, "-c", LOADER, str(root / "requests.json")], env=env, cwd="/",
                                capture_output=True, text=True, timeout=600)
        shown = {name: process.communicate(timeout=600) + (process.returncode,) for name, process in processes.items()}
        shown["bad_checkpoint"] = bad.communicate(timeout=600) + (bad.returncode,)
    finally:
        os.rename(moved, encoder_dir)
    assert loader.returncode == 0, loader.stderr[-3000:]
    return expected, json.loads(loader.stdout.splitlines()[-1]), shown


def test_classification_export_answers_like_predict(served):
    expected, results, _ = served
    got = results["sst2"]
    assert got["label"] == expected["sst2"]["label"]
    np.testing.assert_allclose(got["probabilities"], expected["sst2"]["probabilities"], atol=1e-5, rtol=0)
    assert got["label_id"] == [["neg", "pos"].index(label) for label in got["label"]]
    assert set(got["label"]) == {"neg", "pos"}, "a one-label model would make the comparison vacuous"


def test_squad_export_answers_like_predict(served, trained):
    expected, results, _ = served
    got = results["squad"]
    assert got["answer"] == expected["squad"]
    contexts = trained["squad"][4]["context"]
    for answer, start, end, score, context in zip(got["answer"], got["start"], got["end"], got["score"], contexts):
        assert context[start:end] == answer and np.isfinite(score)
    # Several questions need more than one window of 64 tokens: the in-graph windowing is exercised.
    task = trained["squad"][0]
    tokens = squad_data.OffsetTokenizer(task.vocab_file).tokenize(contexts)
    assert sum(len(t.ids) > 64 for t in tokens) >= 5


def test_conll_ner_export_finds_the_entities_of_predict(served):
    expected, results, _ = served
    got = results["conll_ner"]
    entities = [[(got["entity_text"][i][j], got["entity_type"][i][j], got["start"][i][j], got["end"][i][j])
                 for j in range(count)] for i, count in enumerate(got["num_entities"])]
    assert [[tuple(e) for e in row] for row in entities] == expected["conll_ner"]
    assert sum(map(len, expected["conll_ner"])) >= 10, "a model finding no entities would make this vacuous"


@pytest.mark.parametrize("name", sorted(EXPECTED_SIGNATURES))
def test_saved_model_cli_lists_the_signature(served, name):
    stdout, stderr, returncode = served[2][name]
    assert returncode == 0, stderr[-2000:]
    inputs_part, outputs_part = stdout.split("The given SavedModel SignatureDef contains the following output(s):")
    want_inputs, want_outputs = EXPECTED_SIGNATURES[name]
    assert sorted(line.split("'")[1] for line in inputs_part.splitlines() if "inputs['" in line) == want_inputs
    assert sorted(line.split("'")[1] for line in outputs_part.splitlines() if "outputs['" in line) == want_outputs
    assert "dtype: DT_STRING" in inputs_part and "Method name is: tensorflow/serving/predict" in stdout


def _saved_variables(export_dir) -> dict:
    """{dtype name: total elements} of a SavedModel's variables."""
    reader = tf.train.load_checkpoint(os.path.join(export_dir, "variables", "variables"))
    totals = {}
    for name, shape in reader.get_variable_to_shape_map().items():
        dtype = reader.get_variable_to_dtype_map()[name]
        if dtype.is_floating:
            totals[dtype.name] = totals.get(dtype.name, 0) + int(np.prod(shape))
    return totals


def _saved_graph(export_dir):
    """A SavedModel's GraphDef (its functions in the library)."""
    from tensorflow.core.protobuf import saved_model_pb2  # noqa: PLC0415
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    return saved.meta_graphs[0].graph_def


def _bf16_constant_elements(graph_def) -> int:
    """Elements of the bfloat16 constants in a (SavedModel's) graph."""
    return sum(int(np.prod(shape)) for shape in constant_shapes(graph_def, tf.bfloat16))


def test_bfloat16_export_answers_within_bf16_rounding_and_holds_the_dense_kernels_in_bf16(
        trained, encoder_dir, tmp_path, monkeypatch):
    """--serving_precision=bfloat16: the classifier's answers within bf16 rounding of the float32 model's (and not
    equal to them); the SavedModel holds the blocks' dense kernels as bf16 constants of its graph, not as float32
    variables, and no op of our C++ libraries, also where bf16 dense layers add their bias apart (AMX CPUs, patched
    in: there it once wrote EngineBiasAdd, and the export did not load elsewhere)."""
    monkeypatch.setattr(host, "cpu_has_amx", lambda: True)
    task, model, model_dir, extra, inputs = trained["sst2"]
    paths = {precision: export("sst2", model_dir, str(tmp_path / precision), encoder_dir, *extra,
                               f"--serving_precision={precision}") for precision in ("float32", "bfloat16")}
    serve = tf.saved_model.load(paths["bfloat16"]).signatures["serving_default"]
    got = serve(sentence=tf.constant(inputs["sentence"]))
    labels, probabilities = task.predict(model, inputs["sentence"])
    difference = np.abs(got["probabilities"].numpy() - probabilities).max()
    assert 1e-6 < difference < 0.02, difference
    assert [label.decode() for label in got["label"].numpy()] == labels
    # Both exports hold the dense kernels and biases as graph constants (float32 ones in the float32 export), not
    # variables (engine/dense.py runs them in halves), and the LayerNorms' gamma and beta too (float32 in both).
    dense_layers = [layer for layer in model.submodules if dense_ops.is_plain(layer)]
    kernels = sum(int(np.prod(layer.kernel.shape)) for layer in dense_layers)
    biases = sum(int(np.prod(layer.bias.shape)) for layer in dense_layers)
    norms = sum(int(np.prod(layer.gamma.shape)) + int(np.prod(layer.beta.shape)) for layer in model.submodules
                if isinstance(layer, tf_keras.layers.LayerNormalization))
    float32 = _saved_variables(paths["float32"])
    assert kernels > 0 and norms > 0 and _saved_variables(paths["bfloat16"]) == float32
    assert float32["float32"] == sum(int(np.prod(v.shape)) for v in model.variables) - kernels - biases - norms
    # Once per traced call of a layer: twice where the padding cond traces both branches (not in the last layer,
    # which computes [CLS] only), plus bf16 scalars such as GELU's.
    graphs = {precision: _saved_graph(path) for precision, path in paths.items()}
    assert kernels <= _bf16_constant_elements(graphs["bfloat16"]) <= 2 * kernels + 64
    assert _bf16_constant_elements(graphs["float32"]) == 0
    for graph_def in graphs.values():
        assert not [node.op for node in graph_nodes(graph_def) if node.op.startswith("Engine")]
    with pytest.raises(app.UsageError, match="--serving_precision is for --task exports"):
        flag_values = flags.FlagValues()
        export_launcher.define_flags(flag_values)
        flag_values(["export", f"--encoder={encoder_dir}", f"--export_dir={tmp_path / 'encoder'}",
                     "--serving_precision=bfloat16"])
        export_launcher.run(flag_values)


def test_bad_checkpoints_are_one_clear_error(trained, encoder_dir, tmp_path):
    sst2_flags = ["--max_seq_length=32", "--label_names=neg,pos"]
    with pytest.raises(FileNotFoundError, match=r"no such folder or checkpoint \(expected a launch.train --model_dir"):
        export("sst2", str(tmp_path / "nope"), str(tmp_path / "out"), encoder_dir, *sst2_flags)
    with pytest.raises(FileNotFoundError, match=r"expected a launch.train --model_dir with a `checkpoint` file.*"
                                                r"bert_config.json"):
        export("sst2", encoder_dir, str(tmp_path / "out"), encoder_dir, *sst2_flags)
    # The encoder's own checkpoint is not a fine-tuned model.
    with pytest.raises(ValueError, match=r"holds \['encoder'\], not a `model`: expected a launch.train checkpoint "
                                         r"of --task=sst2"):
        export("sst2", os.path.join(encoder_dir, "encoder"), str(tmp_path / "out"), encoder_dir, *sst2_flags)
    # A SQuAD model has exactly the variables of a 2-class classifier; its layer layout gives it away.
    with pytest.raises(ValueError, match=r"does not match --task=sst2 .*\n  a different layer layout .*"
                                         r"model/layer-4: expected 0 variable\(s\) \[\], found 2") as error:
        export("sst2", trained["squad"][2], str(tmp_path / "out"), encoder_dir, *sst2_flags)
    assert "--label_names=neg,pos" in str(error.value)
    with pytest.raises(ValueError, match=r"does not match --task=sst2 .*\n  \d+ missing variable\(s\): model/"
                                         r".*\n  \d+ unexpected variable\(s\): model/"):
        export("sst2", trained["conll_ner"][2], str(tmp_path / "out"), encoder_dir, *sst2_flags)
    # Right task, another class count: the head's shapes differ.
    with pytest.raises(ValueError, match=r"2 mis-shaped variable\(s\): .*model/layer_with_weights-1/kernel/"
                                         r".ATTRIBUTES/VARIABLE_VALUE: expected \[64, 3\], found \[64, 2\]"):
        export("sst2", trained["sst2"][2], str(tmp_path / "out"), encoder_dir, "--label_names=neg,pos,meh")
    assert not os.path.exists(tmp_path / "out")  # nothing is written when the checkpoint is refused


def test_command_line_error_is_one_line(served):
    _, stderr, returncode = served[2]["bad_checkpoint"]
    assert returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("launch.export: error:")]
    assert errors == ["launch.export: error: checkpoint '/nonexistent/run': no such folder or checkpoint (expected a "
                      "launch.train --model_dir or a prefix with a run.index file)"], stderr[-2000:]
    assert "Traceback" not in stderr


def test_predict_command_answers_like_the_task(trained, encoder_dir, tmp_path):
    """launch.predict for sst2 (--input_file) and conll_ner (--text), in new processes, against Task.predict;
    a model flag that does not match the checkpoint is one clear error line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    def start(task_name, *args):
        return subprocess.Popen([sys.executable, "-m", "launch.predict", f"--task={task_name}",
                                 f"--model_dir={trained[task_name][2]}", f"--init_encoder={encoder_dir}", *args],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    sst2_task, sst2_model, _, sst2_flags, sst2_inputs = trained["sst2"]
    sentences = [s for s in sst2_inputs["sentence"] if s.strip() and "\t" not in s]
    (tmp_path / "sentences.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    ner_task, ner_model, _, ner_flags, ner_inputs = trained["conll_ner"]
    texts = [t for t in ner_inputs["text"] if t.strip()][:12]
    processes = {
        "sst2": start("sst2", *sst2_flags, f"--input_file={tmp_path / 'sentences.txt'}",
                      f"--output_json={tmp_path / 'sst2.jsonl'}"),
        "conll_ner": start("conll_ner", *ner_flags, *[f"--text={t}" for t in texts]),
        "mismatch": start("conll_ner", *ner_flags, "--head=softmax", "--text=Paris"),
    }
    out = {name: p.communicate(timeout=600) + (p.returncode,) for name, p in processes.items()}

    stdout, stderr, returncode = out["sst2"]
    assert returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in stdout.splitlines()]
    labels, probabilities = sst2_task.predict(sst2_model, sentences)
    assert [r["text"] for r in rows] == sentences and [r["label"] for r in rows] == labels
    np.testing.assert_allclose([r["probabilities"] for r in rows], probabilities, atol=1e-5)
    assert (tmp_path / "sst2.jsonl").read_text(encoding="utf-8").splitlines() == stdout.splitlines()

    stdout, stderr, returncode = out["conll_ner"]
    assert returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in stdout.splitlines()]
    expected = ner_task.predict(ner_model, texts)
    assert [[(e["text"], e["type"], e["start"], e["end"]) for e in r["entities"]] for r in rows] == [
        [(e.text, e.type, e.start, e.end) for e in found] for found in expected]
    assert sum(len(r["entities"]) for r in rows) >= 5, "a model finding no entities would make this vacuous"

    _, stderr, returncode = out["mismatch"]
    assert returncode == 1 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("launch.predict: error:")]
    assert len(errors) == 1 and "does not match --task=conll_ner" in errors[0] and "--head=softmax" in errors[0], stderr
