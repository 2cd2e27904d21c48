"""Work function of the `tok_eval` stage (nanochat scripts/tok_eval.py @1ec0a34).

Compression ratio (UTF-8 bytes per token, higher is better) of our tokenizer against the
GPT-2 and GPT-4 (cl100k_base) tiktoken encodings, on five fixed samples plus a sample of
the train and validation text. The baselines need network access or a tiktoken cache
(TIKTOKEN_CACHE_DIR); when neither is there they are reported as unavailable, with the
reason, and the evaluation still succeeds.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading

from nanopipe.tokenizer.bpe import Tokenizer

# The five fixed samples, from nanochat scripts/tok_eval.py @1ec0a34, verbatim except that the
# blank lines inside them are dropped: byte counts here news 1817, korean 890, code 1255,
# math 1825, science 1112 (upstream 1819, 893, 1259, 1834, 1112). Kept as they are, so that
# our tok_eval numbers stay comparable from run to run.
NEWS_TEXT = r"""
(Washington, D.C., July 9, 2025)- Yesterday, Mexico’s National Service of Agro-Alimentary Health, Safety, and Quality (SENASICA) reported a new case of New World Screwworm (NWS) in Ixhuatlan de Madero, Veracruz in Mexico, which is approximately 160 miles northward of the current sterile fly dispersal grid, on the eastern side of the country and 370 miles south of the U.S./Mexico border. This new northward detection comes approximately two months after northern detections were reported in Oaxaca and Veracruz, less than 700 miles away from the U.S. border, which triggered the closure of our ports to Mexican cattle, bison, and horses on May 11, 2025.
While USDA announced a risk-based phased port re-opening strategy for cattle, bison, and equine from Mexico beginning as early as July 7, 2025, this newly reported NWS case raises significant concern about the previously reported information shared by Mexican officials and severely compromises the outlined port reopening schedule of five ports from July 7-September 15. Therefore, in order to protect American livestock and our nation’s food supply, Secretary Rollins has ordered the closure of livestock trade through southern ports of entry effective immediately.
“The United States has promised to be vigilant — and after detecting this new NWS case, we are pausing the planned port reopening’s to further quarantine and target this deadly pest in Mexico. We must see additional progress combatting NWS in Veracruz and other nearby Mexican states in order to reopen livestock ports along the Southern border,” said U.S. Secretary of Agriculture Brooke L. Rollins. “Thanks to the aggressive monitoring by USDA staff in the U.S. and in Mexico, we have been able to take quick and decisive action to respond to the spread of this deadly pest.”
""".strip()

KOREAN_TEXT = r"""
정직한 사실 위에, 공정한 시선을 더하다
Herald Korea Times
헤럴드코리아타임즈는 정치, 경제, 사회, 문화 등 한국 사회 전반의 주요 이슈를 심도 있게 다루는 종합 온라인 신문사입니다.
우리는 단순히 뉴스를 전달하는 것이 아니라, 사실(Fact)에 기반한 양측의 시각을 균형 있게 조명하며, 독자 여러분이 스스로 판단할 수 있는 ‘정보의 균형’을 제공합니다.
한국 언론의 오랜 문제로 지적되어 온 정치적 편향, 이념적 왜곡에서 벗어나
오직 정직함과 공정함을 원칙으로 삼는 언론을 지향합니다.
어느 한쪽의 주장만을 확대하거나 감추지 않고,
**모든 쟁점에 대해 ‘무엇이 쟁점인지’, ‘누가 무엇을 주장하는지’, ‘사실은 무엇인지’**를 명확히 전달하는 데 집중합니다.
""".strip()

CODE_TEXT = r"""
class BasicTokenizer(Tokenizer):
    def __init__(self):
        super().__init__()
    def train(self, text, vocab_size, verbose=False):
        assert vocab_size >= 256
        num_merges = vocab_size - 256
        # input text preprocessing
        text_bytes = text.encode("utf-8") # raw bytes
        ids = list(text_bytes) # list of integers in range 0..255
        # iteratively merge the most common pairs to create new tokens
        merges = {} # (int, int) -> int
        vocab = {idx: bytes([idx]) for idx in range(256)} # int -> bytes
        for i in range(num_merges):
            # count up the number of times every consecutive pair appears
            stats = get_stats(ids)
            # find the pair with the highest count
            pair = max(stats, key=stats.get)
            # mint a new token: assign it the next available id
            idx = 256 + i
            # replace all occurrences of pair in ids with idx
            ids = merge(ids, pair, idx)
            # save the merge
            merges[pair] = idx
            vocab[idx] = vocab[pair[0]] + vocab[pair[1]]
            # prints
            if verbose:
                print(f"merge {i+1}/{num_merges}: {pair} -> {idx} ({vocab[idx]}) had {stats[pair]} occurrences")
""".strip()

MATH_TEXT = r"""
\documentclass[12pt]{article}
\usepackage{amsmath,amsthm,amssymb}
\usepackage[margin=1in]{geometry}
\newtheorem{theorem}{Theorem}
\newtheorem*{remark}{Remark}
\begin{document}
\begin{center}
{\Large A Cute Identity: The Sum of Cubes is a Square}
\end{center}
\begin{theorem}
For every integer $n \ge 1$,
\[
\sum_{k=1}^{n} k^{3} \;=\; \left(\frac{n(n+1)}{2}\right)^{2}.
\]
\end{theorem}
\begin{proof}[Proof 1 (Induction)]
Let $S(n) = \sum_{k=1}^{n} k^3$. For $n=1$, $S(1)=1=(1\cdot 2/2)^2$, so the base case holds.
Assume $S(n)=\big(\tfrac{n(n+1)}{2}\big)^2$ for some $n\ge 1$.
Then
\[
S(n+1)
= S(n) + (n+1)^3
= \left(\frac{n(n+1)}{2}\right)^2 + (n+1)^3.
\]
Factor out $(n+1)^2$:
\[
S(n+1)
= (n+1)^2\left( \frac{n^2}{4} + (n+1) \right)
= (n+1)^2\left( \frac{n^2 + 4n + 4}{4} \right)
= (n+1)^2\left( \frac{(n+2)^2}{4} \right).
\]
Thus
\[
S(n+1)=\left(\frac{(n+1)(n+2)}{2}\right)^2,
\]
which matches the claimed formula with $n$ replaced by $n+1$. By induction, the identity holds for all $n\ge 1$.
\end{proof}
\begin{proof}[Proof 2 (Algebraic telescoping)]
Recall the binomial identity
\[
(k+1)^4 - k^4 = 4k^3 + 6k^2 + 4k + 1.
\]
Summing both sides from $k=0$ to $n$ telescopes:
\[
(n+1)^4 - 0^4
= \sum_{k=0}^{n}\big(4k^3 + 6k^2 + 4k + 1\big)
= 4\sum_{k=1}^{n}k^3 + 6\sum_{k=1}^{n}k^2 + 4\sum_{k=1}^{n}k + (n+1).
\]
Using the standard sums
\[
\sum_{k=1}^{n}k = \frac{n(n+1)}{2}
\quad\text{and}\quad
\sum_{k=1}^{n}k^2 = \frac{n(n+1)(2n+1)}{6},
\]
solve for $\sum_{k=1}^{n}k^3$ to get
\[
\sum_{k=1}^{n}k^3 = \left(\frac{n(n+1)}{2}\right)^2.
\]
\end{proof}
\begin{remark}
Geometrically, the identity says: ``adding up $1^3,2^3,\dots,n^3$ builds a perfect square’’—namely the square of the $n$th triangular number. This is why one sometimes calls it the \emph{sum-of-cubes is a square} phenomenon.
\end{remark}
\end{document}
""".strip()

SCIENCE_TEXT = r"""
Photosynthesis is a photochemical energy transduction process in which light-harvesting pigment–protein complexes within the thylakoid membranes of oxygenic phototrophs absorb photons and initiate charge separation at the reaction center, driving the linear electron transport chain from water to NADP⁺ via photosystem II, the cytochrome b₆f complex, and photosystem I, concomitantly generating a trans-thylakoid proton motive force utilized by chloroplastic ATP synthase. The light-dependent reactions produce ATP and NADPH, which fuel the Calvin–Benson–Bassham cycle in the stroma, wherein ribulose-1,5-bisphosphate is carboxylated by ribulose-1,5-bisphosphate carboxylase/oxygenase (RuBisCO) to form 3-phosphoglycerate, subsequently reduced and regenerated through a series of enzymatic steps, enabling net assimilation of CO₂ into triose phosphates and ultimately carbohydrates. This process is tightly regulated by photoprotective mechanisms, redox feedback, and metabolite flux, representing a central biochemical pathway coupling solar energy capture to the biosphere’s primary productivity.
""".strip()

SAMPLE_TEXTS = [
    ("news", NEWS_TEXT),
    ("korean", KOREAN_TEXT),
    ("code", CODE_TEXT),
    ("math", MATH_TEXT),
    ("science", SCIENCE_TEXT),
]

# display name -> (results key, tiktoken encoding name), as in tok_eval
BASELINES = {"GPT-2": ("gpt2", "gpt2"), "GPT-4": ("gpt4", "cl100k_base")}

# the files tiktoken fetches for each encoding (to tell "cached" from "needs a download")
_TIKTOKEN_FILES = {
    "gpt2": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"],
    "cl100k_base": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"],
}


def _tiktoken_cache_dir() -> str:
    # same resolution order as tiktoken.load.read_file_cached
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _is_cached(tiktoken_name: str) -> bool:
    cache_dir = _tiktoken_cache_dir()
    urls = _TIKTOKEN_FILES.get(tiktoken_name)
    if not cache_dir or not urls:
        return False
    return all(os.path.exists(os.path.join(cache_dir, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


def load_baseline(tiktoken_name: str, timeout_s: float = 10.0, allow_download: bool = True):
    """(Tokenizer, None) or (None, reason). Never blocks longer than timeout_s: tiktoken's
    download has no timeout of its own, so it runs on a daemon thread we stop waiting for."""
    cached = _is_cached(tiktoken_name)
    where = f"tiktoken cache {_tiktoken_cache_dir() or '(disabled)'}"
    if not cached and not allow_download:
        return None, f"not in the {where} and downloads are disabled"
    box: dict = {}

    def load():
        try:
            box["tok"] = Tokenizer.from_pretrained(tiktoken_name)
        except BaseException as e:  # any failure makes the baseline unavailable, never the stage
            box["err"] = e

    thread = threading.Thread(target=load, name=f"tiktoken-{tiktoken_name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return None, (f"loading {tiktoken_name!r} did not finish within {timeout_s:g}s (not in the {where}; "
                      f"no network?); set TIKTOKEN_CACHE_DIR to a directory holding its files")
    if "err" in box:
        e = box["err"]
        if not cached:  # offline, nearly always: one clean line and the fix, not the network library's text
            return None, (f"{tiktoken_name!r} is not in the {where} and could not be downloaded ({type(e).__name__}); "
                          f"set TIKTOKEN_CACHE_DIR to a directory holding its files")
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        return None, f"loading {tiktoken_name!r} failed: {type(e).__name__}: {msg}"
    return box["tok"], None


def measure(tokenizer: Tokenizer, texts: list[tuple[str, str]], name: str = "ours") -> dict:
    """{label: {bytes, tokens, ratio}}; every text must round-trip losslessly."""
    out = {}
    for label, text in texts:
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) != text:
            raise RuntimeError(f"tokenizer {name!r} does not round-trip the {label!r} text losslessly")
        n_bytes = len(text.encode("utf-8"))
        out[label] = {"bytes": n_bytes, "tokens": len(ids), "ratio": n_bytes / max(len(ids), 1)}
    return out


def evaluate_tokenizer(tokenizer: Tokenizer, val_text: str = "", train_text: str = "",
                       baselines: dict | None = None, timeout_s: float = 10.0,
                       allow_download: bool = True) -> tuple[dict, str]:
    """Compare `tokenizer` with the GPT-2/GPT-4 baselines. Returns (metrics, markdown).

    val_text / train_text: samples of the validation and training text (nanochat: the first
    row group of each split, joined with newlines); each is used only if non-empty.
    baselines: {"GPT-2": Tokenizer or None, ...} to supply baselines directly (None = load);
    by default both are loaded with tiktoken, each with `timeout_s` to succeed.
    """
    texts = list(SAMPLE_TEXTS)
    if train_text:
        texts.append(("train", train_text))
    if val_text:
        texts.append(("val", val_text))

    results = {"ours": measure(tokenizer, texts, "ours")}
    vocab_sizes = {"ours": tokenizer.get_vocab_size()}
    status = {}
    supplied = baselines if baselines is not None else {name: None for name in BASELINES}
    for display, given in supplied.items():
        key, tiktoken_name = BASELINES.get(display, (display.lower().replace("-", ""), display))
        tok, reason = (given, None) if given is not None else load_baseline(tiktoken_name, timeout_s, allow_download)
        status[key] = {"name": display, "tiktoken": tiktoken_name, "available": tok is not None, "reason": reason}
        if tok is None:
            print(f"{display} baseline unavailable: {reason}")
            continue
        results[key] = measure(tok, texts, key)
        vocab_sizes[key] = tok.get_vocab_size()

    summary = {f"{key}_vocab_size": v for key, v in vocab_sizes.items()}
    for key, per_text in results.items():
        for label, r in per_text.items():
            summary[f"{key}_ratio_{label}"] = r["ratio"]
    metrics = {
        "texts": [label for label, _ in texts],
        "vocab_sizes": vocab_sizes,
        "baselines": status,
        "results": results,
        "summary": summary,  # flat scalars, e.g. for MLflow / metrics json
    }
    return metrics, markdown_report(metrics)


def markdown_report(metrics: dict) -> str:
    """tok_eval's report section body: one comparison table per baseline, as in
    nanochat scripts/tok_eval.py @1ec0a34."""
    ours = metrics["results"]["ours"]
    lines = []
    for key, st in metrics["baselines"].items():
        name = st["name"]
        lines += [f"### Comparison with {name}", ""]
        if not st["available"]:
            lines += [f"{name} baseline unavailable: {st['reason']}", ""]
            continue
        base = metrics["results"][key]
        lines.append(f"| Text Type | Bytes | {name} Tokens | {name} Ratio | Ours Tokens | Ours Ratio | Relative Diff % |")
        lines.append("|-----------|-------|--------------|--------------|-------------|------------|-----------------|")
        for label in metrics["texts"]:
            b, o = base[label], ours[label]
            diff = (b["tokens"] - o["tokens"]) / max(b["tokens"], 1) * 100  # positive: ours uses fewer tokens
            lines.append(f"| {label} | {b['bytes']} | {b['tokens']} | {b['ratio']:.2f} | {o['tokens']} | {o['ratio']:.2f} | {diff:+.1f}% |")
        lines.append("")
    if not any(st["available"] for st in metrics["baselines"].values()):
        # no baseline to compare with: still record our own numbers
        lines += ["### Our tokenizer", "", "| Text Type | Bytes | Ours Tokens | Ours Ratio |",
                  "|-----------|-------|-------------|------------|"]
        lines += [f"| {label} | {ours[label]['bytes']} | {ours[label]['tokens']} | {ours[label]['ratio']:.2f} |"
                  for label in metrics["texts"]]
        lines.append("")
    return "\n".join(lines)


def console_report(metrics: dict) -> str:
    """tok_eval's colored console tables: the winner by ratio in green, the loser in red."""
    GREEN, RED, RESET = "\033[92m", "\033[91m", "\033[0m"
    names = {"ours": "Ours", **{k: st["name"] for k, st in metrics["baselines"].items()}}
    out = ["", "Vocab sizes:"] + [f"{names[k]}: {v}" for k, v in metrics["vocab_sizes"].items()]
    ours = metrics["results"]["ours"]
    for key, st in metrics["baselines"].items():
        name = st["name"]
        if not st["available"]:
            out += ["", f"Comparison with {name}: unavailable ({st['reason']})"]
            continue
        base = metrics["results"][key]
        out += ["", f"Comparison with {name}:", "=" * 95,
                f"{'Text Type':<10} {'Bytes':<8} {name:<15} {'Ours':<15} {'Relative':<12} {'Better':<10}",
                f"{'':10} {'':8} {'Tokens':<7} {'Ratio':<7} {'Tokens':<7} {'Ratio':<7} {'Diff %':<12}",
                "-" * 95]
        for label in metrics["texts"]:
            b, o = base[label], ours[label]
            diff = (b["tokens"] - o["tokens"]) / max(b["tokens"], 1) * 100
            if b["ratio"] > o["ratio"]:
                bc, oc, dc, better = GREEN, RED, RED, name
            elif o["ratio"] > b["ratio"]:
                bc, oc, dc, better = RED, GREEN, GREEN, "Ours"
            else:
                bc, oc, dc, better = "", "", "", "Tie"
            out.append(f"{label:<10} {b['bytes']:<8} {bc}{b['tokens']:<7}{RESET} {bc}{b['ratio']:<7.2f}{RESET} "
                       f"{oc}{o['tokens']:<7}{RESET} {oc}{o['ratio']:<7.2f}{RESET} {dc}{diff:+7.1f}%{RESET}     {better:<10}")
    return "\n".join(out)
