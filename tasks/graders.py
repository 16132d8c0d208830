"""Answer graders for reasoning tasks: extract a final answer from generated text, decide equivalence.

Why: pass@1 is only as good as its grader: exact string matching undercounts (``\\dfrac34`` vs
``\\frac{3}{4}``, ``1,000`` vs ``1000``), a lax numeric one overcounts. Deterministic, offline rules:

- ``extract_boxed``: the last non-empty ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; truncated: none).
- ``normalize_math``: MATH-style string normalisation (``$``, ``\\left``/``\\right``, ``\\!``, spaces,
  trailing ``\\text{}`` units, trailing ``.``, ``^\\circ``, ``\\dfrac``/``\\tfrac``, ``\\frac12``,
  ``\\sqrt2``, a leading ``x=``, a whole answer that is one comma-grouped number, ``\\text{(A)}``).
- ``math_equal``: normalised strings equal; else, element-wise for tuples / intervals (ordered,
  same brackets) and bare comma lists (unordered); else the value of both sides from a small LaTeX
  arithmetic parser (``+ - * / ^``, ``\\frac``, ``\\sqrt``, ``\\pi``, ``\\cdot``, implicit products,
  single-letter variables). Tolerance rule: two rational values (integers, decimals, fractions)
  must be EXACTLY equal, so ``0.33`` != ``\\frac13`` and ``1.4142`` != ``\\sqrt2`` (MATH answers are
  exact; a rounded decimal is not the answer). Irrational values are compared with a relative
  tolerance of 1e-9 (floating-point noise only). Expressions with variables are equal when they
  agree at three fixed points. Percent rule: ``p%`` equals both ``p`` and ``p/100`` (so ``10%``
  == ``10`` and ``10%`` == ``0.1``, but ``10`` != ``0.1``). Last resort: ``sympy.parsing.latex``
  only when its parser backend (lark or antlr4) is importable; otherwise skipped.
- ``math_verify_equal``: the same decision by ``math-verify`` (the library the R1-distill
  evaluations grade with; the reasoning task's default, ``task.math_grader=math_verify``), each
  answer given to it as ``\\boxed{...}`` with a raw ``%`` escaped and sentence punctuation dropped,
  parse and comparison under a timeout (seconds; signals only work in the main thread, so in
  other threads the comparison runs without one). ``tests/test_graders.py`` runs both on the same
  53-pair table and states, where they disagree, which is right and why.
- ``extract_choice``: a multiple-choice letter ("The answer is (C)", "Answer: C", ``\\boxed{C}``,
  "**C**", else the last standalone valid letter).
- ``extract_final_number``: GSM8K numbers ("#### 42", "The answer is 42", ``\\boxed{42}``, else the
  last number), commas removed, sign kept, trailing zeros of decimals dropped.
"""

from __future__ import annotations

import importlib.util
import math
import re
from fractions import Fraction

# ---- extraction ------------------------------------------------------------------------------


def extract_boxed(text: str | None) -> str | None:
    """Content of the last non-empty ``\\boxed{...}`` in ``text`` (nested braces), or None."""
    if not text:
        return None
    starts = sorted(m.start() for m in re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])", text))
    for start in reversed(starts):
        i = start + (6 if text.startswith("\\boxed", start) else 5)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    content = text[i + 1 : j].strip()
                    if content:
                        return content
                    break
        elif i > start + 5:  # "\boxed 5": the next token
            m = re.match(r"[^\s$]+", text[i:])
            return m.group(0).rstrip(".") if m else None
    return None


_LETTER = r"\(?\**\s*\(?([{L}])\)?(?![A-Za-z0-9])"


def extract_choice(text: str | None, letters: str = "ABCD") -> str | None:
    """The chosen option letter (upper case, one of ``letters``) or None."""
    if not text:
        return None
    cls = re.escape(letters)
    letter = _LETTER.replace("{L}", cls)
    patterns = (
        r"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*(?:(?i:option)\s*)?\**\s*" + letter,
        rf"\\boxed\{{\s*(?:\\text(?:bf)?\{{)?\s*\(?([{cls}])\)?\s*\}}",
        rf"\*\*\s*\(?([{cls}])\)?[.:]?\s*\*\*",
        rf"\(([{cls}])\)",
    )
    for pattern in patterns:
        found = re.findall(pattern, text)
        if found:
            return found[-1].upper()
    # last standalone letter; "A" followed by a lower-case word is the article, not an option
    bare = [
        m.group(1)
        for m in re.finditer(rf"(?<![A-Za-z0-9'])([{cls}])(?![A-Za-z0-9'])", text)
        if not (m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end() :]))
    ]
    return bare[-1] if bare else None


_NUM = r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"


def _clean_number(s: str) -> str:
    s = s.replace(",", "")
    s = re.sub(r"^(-?)\.", r"\g<1>0.", s.rstrip("0").rstrip(".") if "." in s else s)
    return "0" if s in ("-0", "") else s


def extract_final_number(text: str | None) -> str | None:
    """The final numeric answer of a GSM8K-style solution, as a clean string ("1234", "-2.5")."""
    if not text:
        return None
    boxed = extract_boxed(text) or ""
    for pattern, where in (
        (r"####\s*\$?\s*(" + _NUM + ")", text),
        (r"(?i:answer)\s*(?:is|:)\s*[:$\\\s]*(" + _NUM + ")", text),
        (_NUM, boxed),
        (_NUM, text),
    ):
        found = re.findall(pattern, where)
        if found:
            return _clean_number(found[-1])
    return None


# ---- normalisation ---------------------------------------------------------------------------

_TEXT_CMD = r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)"


def _balanced(s: str, opens: str = "{", closes: str = "}") -> bool:
    depth = 0
    for ch in s:
        depth += 1 if ch in opens else -1 if ch in closes else 0
        if depth < 0:
            return False
    return depth == 0


def normalize_math(ans: object) -> str:
    """MATH-style canonical string of an answer (see the module docstring for the rules)."""
    s = str(ans).strip().replace("\n", " ")
    if s.startswith(("\\boxed", "\\fbox")):
        s = extract_boxed(s) or s
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("%", "")
    s = re.sub(r"\\(?:left|right)\s*(?:\.|\\(?=[{}])|(?![a-zA-Z]))", "", s)
    for junk in ("\\!", "\\,", "\\;", "\\:", "\\displaystyle", "{}^\\circ", "^{\\circ}", "^\\circ", "°"):
        s = s.replace(junk, "")
    s = re.sub(r"(?<!\\)\\ ", " ", s).replace("~", " ")  # "\ " is a space, "\\" a line break
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = s.replace("{,}", ",").strip()
    m = re.fullmatch(_TEXT_CMD + r"\{(.*)\}", s)  # the whole answer is \text{...}
    s = m.group(1).strip() if m and _balanced(m.group(1)) else s
    # trailing units: "5 \text{ cm}^2", "12\mbox{ inches}"
    s = re.sub(r"(?<=\S)\s*" + _TEXT_CMD + r"\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?\s*\.?$", "", s)
    s = re.sub(_TEXT_CMD + r"\{([^{}]*)\}", r"\1", s)  # any other \text{...}: keep its content
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)  # LaTeX: \sqrt23 is sqrt(2)*3
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}\s*([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = s.replace(" ", "")
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    m = re.fullmatch(r"\(([A-Za-z])\)", s)
    if m:
        s = m.group(1)
    while s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        s = s[1:-1]
    return s


# ---- a small LaTeX arithmetic parser -----------------------------------------------------------

_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|\\[a-zA-Z]+|[a-zA-Z]|[-+*/^(){}\[\]]")


class _ParseError(ValueError):
    pass


class _Parser:
    """Recursive descent over tokens; builds nested tuples ("num"|"var"|"op"|"sqrt"|"neg", ...)."""

    def __init__(self, s: str) -> None:
        pos, self.toks = 0, []
        for m in _TOKEN.finditer(s):
            if m.start() != pos:
                raise _ParseError(s)
            self.toks.append(m.group(0))
            pos = m.end()
        if pos != len(s) or not self.toks:
            raise _ParseError(s)
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise _ParseError(f"expected {want}")
        self.i += 1
        return tok

    def parse(self) -> tuple:
        node = self.expr()
        return node if self.peek() is None else self.take("<end>")  # trailing tokens: error

    def expr(self) -> tuple:
        node = self.term()
        while self.peek() in ("+", "-"):
            node = ("op", self.take(), node, self.term())
        return node

    def term(self) -> tuple:
        node = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "/", "\\cdot", "\\times", "\\div"):
                self.take()
                node = ("op", "/" if tok in ("/", "\\div") else "*", node, self.unary())
            elif tok is not None and (tok[0].isalnum() or tok in ("(", "{", "\\frac", "\\sqrt", "\\pi")):
                node = ("op", "*", node, self.power())
            else:
                return node

    def unary(self) -> tuple:
        if self.peek() in ("-", "+"):
            return ("neg", self.unary()) if self.take() == "-" else self.unary()
        return self.power()

    def power(self) -> tuple:
        base = self.atom()
        if self.peek() == "^":
            self.take()
            return ("op", "^", base, self.unary() if self.peek() in ("-", "+") else self.atom())
        return base

    def group(self, open_: str = "{", close: str = "}") -> tuple:
        self.take(open_)
        node = self.expr()
        self.take(close)
        return node

    def atom(self) -> tuple:
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            return ("num", Fraction(tok))
        if tok in ("(", "[", "{"):
            self.i -= 1
            return self.group(tok, {"(": ")", "[": "]", "{": "}"}[tok])
        if tok == "\\frac":
            return ("op", "/", self.group(), self.group())
        if tok == "\\sqrt":
            if self.peek() == "[":
                index = self.group("[", "]")
                return ("op", "^", self.group(), ("op", "/", ("num", Fraction(1)), index))
            return ("sqrt", self.group())
        if tok == "\\pi":
            return ("num", math.pi)
        if tok == "\\infty":
            return ("num", math.inf)
        if len(tok) == 1 and tok.isalpha():
            return ("var", tok)
        raise _ParseError(f"unsupported {tok}")


def _variables(node: tuple) -> set[str]:
    if node[0] == "var":
        return {node[1]}
    return set().union(*(_variables(c) for c in node[1:] if isinstance(c, tuple)))


_ARITH = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def _eval(node: tuple, env: dict[str, Fraction]) -> Fraction | float:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "var":
        return env[node[1]]
    if kind == "neg":
        return -_eval(node[1], env)
    if kind == "sqrt":
        return _root(_eval(node[1], env), 2)
    _, op, left, right = node
    a, b = _eval(left, env), _eval(right, env)
    if op in _ARITH:
        return _ARITH[op](a, b)
    bits = max(a.numerator.bit_length(), a.denominator.bit_length(), 1) if isinstance(a, Fraction) else 0
    if bits and isinstance(b, Fraction) and b.denominator == 1 and abs(b) * bits < 4096:
        return a ** int(b)
    if isinstance(b, Fraction) and b.numerator == 1 and isinstance(a, Fraction):
        return _root(a, b.denominator)
    if abs(float(b)) > 1e4:
        raise OverflowError("exponent too large")
    return float(a) ** float(b)


def _root(x: Fraction | float, n: int) -> Fraction | float:
    if x < 0:
        raise ValueError("root of a negative number")
    if isinstance(x, Fraction):
        num, den = round(x.numerator ** (1 / n)), round(x.denominator ** (1 / n))
        if num**n == x.numerator and den**n == x.denominator:
            return Fraction(num, den)
    return float(x) ** (1 / n)


_POINTS = (Fraction(7, 5), Fraction(13, 7), Fraction(23, 11))


def _values(s: str, percent: bool) -> tuple[set[str], list[list[Fraction | float]]] | None:
    """Variables of ``s`` and its values at the fixed points (also /100 for a percentage)."""
    if len(s) > 200:
        return None
    try:
        node = _Parser(s).parse()
        names = sorted(_variables(node))
        points = [{v: p + k for k, v in enumerate(names)} for p in _POINTS] if names else [{}]
        vals = [_eval(node, env) for env in points]
    except (_ParseError, ArithmeticError, ValueError, TypeError, RecursionError):
        return None
    return set(names), [vals, [v / 100 for v in vals]] if percent else [vals]


def _close(a: Fraction | float, b: Fraction | float) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


# ---- equivalence -------------------------------------------------------------------------------


def _split_list(s: str) -> tuple[str, list[str], str] | None:
    """``(open, items, close)`` when ``s`` has a top-level comma, else None."""
    opener, closer, body = "", "", s
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _balanced(s[1:-1], "([{", ")]}"):
        opener, closer, body = s[0], s[-1], s[1:-1]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if ch == "," and depth == 0:
            items, start = [*items, body[start:i]], i + 1
    items.append(body[start:])
    return (opener, items, closer) if len(items) > 1 else None


def _sympy_equal(p: str, g: str) -> bool | None:
    """Equality by ``sympy.parsing.latex`` when a parser backend is importable, else None."""
    backends = [b for b, mod in (("lark", "lark"), ("antlr", "antlr4")) if importlib.util.find_spec(mod)]
    if not backends or max(len(p), len(g)) > 100:
        return None
    try:
        from sympy.parsing.latex import parse_latex

        a, b = parse_latex(p, backend=backends[0]), parse_latex(g, backend=backends[0])
        names = sorted(a.free_symbols | b.free_symbols, key=str)
        for point in _POINTS:
            env = {v: point + k for k, v in enumerate(names)}
            x, y = complex(a.subs(env).evalf()), complex(b.subs(env).evalf())
            if not math.isclose(abs(x - y), 0, abs_tol=1e-9 * max(1.0, abs(y))):
                return False
        return True
    except Exception:  # noqa: BLE001 - any parser failure means "cannot decide"
        return None


def _equal(p: str, g: str, p_pct: bool, g_pct: bool) -> bool:
    if p == g:
        return True
    if re.fullmatch(r"[A-Za-z][A-Za-z ]*", p) and re.fullmatch(r"[A-Za-z][A-Za-z ]*", g) and len(p) > 1:
        return p.lower() == g.lower()
    pl, gl = _split_list(p), _split_list(g)
    if pl or gl:
        if not (pl and gl) or (pl[0], pl[2]) != (gl[0], gl[2]) or len(pl[1]) != len(gl[1]):
            return False
        if pl[0]:  # tuple / interval: ordered
            return all(_equal(a, b, p_pct, g_pct) for a, b in zip(pl[1], gl[1]))
        rest = list(gl[1])  # bare list: unordered
        for a in pl[1]:
            match = next((i for i, b in enumerate(rest) if _equal(a, b, p_pct, g_pct)), None)
            if match is None:
                return False
            rest.pop(match)
        return True
    pv, gv = _values(p, p_pct), _values(g, g_pct)
    if pv is not None and gv is not None:
        return pv[0] == gv[0] and any(all(map(_close, a, b)) for a in pv[1] for b in gv[1])
    return bool(_sympy_equal(p, g))


def _for_math_verify(answer: object) -> str:
    text = str(answer).strip().rstrip(".").strip()
    return re.sub(r"(?<!\\)%", r"\\%", text)  # a raw % starts a LaTeX comment


def math_verify_equal(pred: object, gold: object, timeout_s: int = 5) -> bool:
    """``math-verify``'s verdict on ``pred`` against ``gold`` (False on a parse failure or timeout)."""
    import threading

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if pred is None or gold is None or not str(pred).strip() or not str(gold).strip():
        return False
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    parsed = [parse("\\boxed{" + _for_math_verify(a) + "}", extraction_config=config, parsing_timeout=timeout)
              for a in (gold, pred)]  # fmt: skip
    return bool(verify(parsed[0], parsed[1], timeout_seconds=timeout))


def math_equal(pred: object, gold: object) -> bool:
    """Whether ``pred`` is the same mathematical answer as ``gold`` (rules: module docstring)."""
    if pred is None or gold is None:
        return False
    p, g = normalize_math(pred), normalize_math(gold)
    if not p or not g:
        return False
    return _equal(p, g, "%" in str(pred), "%" in str(gold))
