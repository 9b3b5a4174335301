"""E2E-style corpus metrics of generated texts against grouped references: BLEU, NIST and ROUGE-L.

    python examples/NLG/e2e_metrics.py REFERENCES HYPOTHESES [--json out.json]
    python examples/NLG/e2e_metrics.py --generations runs/nlg/x/generations_test.jsonl

``REFERENCES`` is in the E2E challenge's layout: the references of one input on consecutive lines, a blank line
between inputs; ``HYPOTHESES`` one output per line, in the same order. ``--generations`` reads the
``generations_<split>.jsonl`` that ``run_clm.py`` writes (``generation`` and ``references`` per input). In E2E every
meaning representation (MR) has several human references: the references are grouped by MR (rows with the same MR
are one input, :func:`nlg_data.group_references`) and each input is generated once.

* **BLEU**: ``sacrebleu`` (``BLEU(tokenize="13a")``, the mteval-v13a tokenisation the E2E script uses), up to four
  references per input or as many as given (a variable number is allowed), closest reference length for the brevity
  penalty, lowercased by default (e2e-metrics' Python MTEval scores case-insensitively; ``--case_sensitive``).
* **NIST** (5-grams): ``nltk.translate.nist_score.corpus_nist`` on the same 13a tokens (nltk's implementation of
  Doddington (2002), not mteval's code: details such as which reference length enters the length penalty may
  differ).
* **ROUGE-L**: the LCS of ``rouge-score`` (its tokenizer: lowercase, alphanumeric runs), combined per input as the
  COCO caption evaluator the E2E script calls does it: the best precision and the best recall over the references,
  ``F = (1 + β²) P R / (R + β² P)`` with ``β = 1.2``, averaged over inputs. ``rougeL_f1_max`` is rouge-score's own
  convention (the best F1 over the references) for comparison with other papers.

All scores are on a 0-100 scale except NIST (unbounded, about 8-9 for good E2E systems).

**Not computed: METEOR and CIDEr.** The E2E script gets both from the COCO caption evaluator (pycocoevalcap), whose
METEOR runs the METEOR 1.5 Java jar and whose tokenizer (used by CIDEr too) runs Stanford CoreNLP's Java
PTBTokenizer; nltk's ``meteor_score`` needs the WordNet corpus (a separate ``nltk.download("wordnet")``), which is not
available offline and is not METEOR 1.5 anyway. Scores here therefore differ in detail from the official
e2e-metrics numbers (tokenisation above all); compare systems scored by the same script only.

Needs ``sacrebleu``, ``nltk`` and ``rouge-score`` (the ``nlg`` extra); each is imported only when its metric runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

ROUGE_BETA = 1.2  # the COCO caption evaluator's (and so the E2E script's) ROUGE-L beta
NIST_ORDER = 5
SCORES = ("bleu", "nist", "rougeL", "rougeL_f1_max")  # the scores score_all returns (BLEU, ROUGE-L 0-100; NIST raw)
REQUIREMENTS = {"sacrebleu": "sacrebleu", "nltk": "nltk", "rouge_score": "rouge-score"}
NOT_COMPUTED = {
    "METEOR": "needs the METEOR 1.5 Java jar (or, for nltk's approximation, the WordNet corpus download)",
    "CIDEr": "the E2E script's CIDEr-D reads text tokenised by Stanford CoreNLP's Java PTBTokenizer",
}


class MetricsError(ValueError):
    """Inputs that cannot be scored (lengths differ, an input without references, a package missing)."""


def missing_packages() -> list[str]:
    """The pip names of the metric packages that are not installed."""
    import importlib.util

    return [pip for module, pip in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise MetricsError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if not hypotheses:
        raise MetricsError("nothing to score: no hypotheses")
    empty = [i for i, refs in enumerate(references) if not [r for r in refs if r and r.strip()]]
    if empty:
        raise MetricsError(f"input(s) {empty[:5]} have no reference")


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference position, ``None`` where an input has fewer references."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool = True) -> float:
    """Corpus BLEU (0-100) by sacrebleu with the 13a tokenizer and its default smoothing (``exp``, which only
    acts on an n-gram order without a match)."""
    _check(hypotheses, references)
    from sacrebleu.metrics import BLEU

    return float(BLEU(tokenize="13a", lowercase=lowercase).corpus_score(list(hypotheses), _streams(references)).score)


def _tokens(text: str, lowercase: bool) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    text = text.lower() if lowercase else text
    return Tokenizer13a()(text.strip()).split()


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool = True,
         order: int = NIST_ORDER) -> float:
    """Corpus NIST (``order``-grams) by nltk on 13a tokens."""
    _check(hypotheses, references)
    from nltk.translate.nist_score import corpus_nist

    refs = [[_tokens(r, lowercase) for r in group if r and r.strip()] for group in references]
    hyps = [_tokens(h, lowercase) for h in hypotheses]
    longest = max(len(h) for h in hyps)
    if longest == 0:
        return 0.0
    # an order no hypothesis reaches adds nothing (nltk would divide by zero): stop at the longest hypothesis
    return float(corpus_nist(refs, hyps, n=min(order, longest)))


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
            beta: float = ROUGE_BETA) -> dict[str, float]:
    """``{"rougeL": E2E/COCO-style ROUGE-L, "rougeL_f1_max": rouge-score's best F1}``, both 0-100 means over inputs.

    Per input: ``P_k``, ``R_k`` = LCS / hypothesis length, LCS / reference length for each reference ``k``
    (rouge-score's tokens); COCO style is ``F_β(max_k P_k, max_k R_k)``, rouge-score style ``max_k F1_k``.
    """
    _check(hypotheses, references)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    coco, best_f1 = [], []
    for hyp, group in zip(hypotheses, references):
        scores = [scorer.score(ref, hyp)["rougeL"] for ref in group if ref and ref.strip()]
        p, r = max(s.precision for s in scores), max(s.recall for s in scores)
        coco.append((1 + beta**2) * p * r / (r + beta**2 * p) if p > 0 and r > 0 else 0.0)
        best_f1.append(max(s.fmeasure for s in scores))
    return {"rougeL": 100.0 * sum(coco) / len(coco), "rougeL_f1_max": 100.0 * sum(best_f1) / len(best_f1)}


def score_all(hypotheses: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool = True) -> dict:
    """Every metric: ``bleu``, ``nist``, ``rougeL``, ``rougeL_f1_max``, the counts, and what is not computed.

    Raises:
        MetricsError: mismatched lengths, an input without references, or a metric package missing.
    """
    missing = missing_packages()
    if missing:
        raise MetricsError(f"the generation metrics need {', '.join(missing)}: {sys.executable} -m pip install "
                           f"{' '.join(missing)}")
    _check(hypotheses, references)
    result = {"bleu": bleu(hypotheses, references, lowercase), "nist": nist(hypotheses, references, lowercase)}
    result.update(rouge_l(hypotheses, references))
    result.update(inputs=len(hypotheses), references=sum(len(r) for r in references), lowercase=lowercase,
                  not_computed=dict(NOT_COMPUTED))
    for key in SCORES:
        if not math.isfinite(result[key]):
            raise MetricsError(f"{key} is not finite ({result[key]})")
    return result


# ---- files --------------------------------------------------------------------------------------------------------
def read_grouped_references(path: str | Path) -> list[list[str]]:
    """The E2E reference layout: references of one input on consecutive lines, blank lines between inputs."""
    groups: list[list[str]] = [[]]
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            groups[-1].append(line.strip())
        elif groups[-1]:
            groups.append([])
    return [g for g in groups if g]


def read_generations(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """``(hypotheses, reference groups)`` of a ``generations_<split>.jsonl`` written by ``run_clm.py``."""
    hyps, refs = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "generation" not in row or not row.get("references"):
            raise MetricsError(f"{path}:{number}: needs 'generation' and a non-empty 'references'")
        hyps.append(row["generation"])
        refs.append(list(row["references"]))
    return hyps, refs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("references", nargs="?", help="E2E-layout reference file (groups separated by blank lines)")
    parser.add_argument("hypotheses", nargs="?", help="one output per line, in the order of the groups")
    parser.add_argument("--generations", help="a generations_<split>.jsonl from run_clm.py instead of the two files")
    parser.add_argument("--case_sensitive", action="store_true", help="BLEU and NIST without lowercasing")
    parser.add_argument("--json", help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.generations:
            if args.references or args.hypotheses:
                parser.error("give --generations or the two files, not both")
            hyps, refs = read_generations(args.generations)
        else:
            if not (args.references and args.hypotheses):
                parser.error("give REFERENCES and HYPOTHESES, or --generations")
            refs = read_grouped_references(args.references)
            hyps = [line.strip() for line in Path(args.hypotheses).read_text(encoding="utf-8").splitlines()]
            while len(hyps) > len(refs) and not hyps[-1]:  # blank lines past the last input; an empty output stays
                hyps.pop()
        scores = score_all(hyps, refs, lowercase=not args.case_sensitive)
    except OSError as err:
        print(f"error: {err.filename}: {err.strerror.lower()}" if err.filename else f"error: {err}", file=sys.stderr)
        return 1
    except (MetricsError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"BLEU {scores['bleu']:.2f}  NIST {scores['nist']:.4f}  ROUGE-L {scores['rougeL']:.2f} "
          f"(rouge-score best F1 {scores['rougeL_f1_max']:.2f})  over {scores['inputs']} inputs, "
          f"{scores['references']} references; METEOR and CIDEr not computed (Java / WordNet)")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
