"""Helpers of the local document-grounded recall tasks (the Based line of work's TriviaQA / NQ /
DROP: the passage is in the prompt; an answer counts when the generation contains it)."""


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def doc_to_text(doc: dict) -> str:
    return doc["context"].strip() + " " + doc["question"].strip()


def doc_to_target(doc: dict) -> str:
    answers = doc["answers"]
    return (answers[0] if isinstance(answers, list) else answers).strip()


def process_results(doc: dict, results: list[str]) -> dict:
    answers = doc["answers"] if isinstance(doc["answers"], list) else [doc["answers"]]
    generated = _norm(results[0])
    return {"contains": float(any(_norm(a) in generated for a in answers if a.strip()))}
