"""The functions tokendrop_synth.yaml names: the image, the question as is, tokendrop's metrics."""

from tokendrop.data.images import open_image
from tokendrop.evaluation.metrics import exact_match, vqa_accuracy


def doc_to_visual(doc):
    return [open_image(doc["image"])]  # relative to the data folder, lmms-eval's working directory; tokendrop's image rule


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]  # the model's chat template is applied by the tokendrop model


def process_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["answers"]), "vqa_accuracy": vqa_accuracy(results[0], doc["answers"])}
