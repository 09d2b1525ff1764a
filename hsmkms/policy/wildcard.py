"""IAM wildcard matching: ``*`` matches any run of characters (also none), ``?`` exactly one.

No other character is special (unlike :mod:`fnmatch`, ``[`` is literal). The matcher is the
two-pointer walk with a single backtrack point, linear in practice and never exponential,
so a hostile policy cannot make evaluation slow.
"""

from __future__ import annotations


def wildcard_match(pattern: str, text: str, *, ignore_case: bool = False) -> bool:
    """True when ``text`` matches ``pattern`` as a whole (IAM ``*``/``?`` globbing)."""
    if ignore_case:
        pattern = pattern.casefold()
        text = text.casefold()
    p = t = 0
    star = -1  # index in pattern just after the last '*'
    resume = 0  # index in text the last '*' is currently absorbing up to
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            p += 1
            star = p
            resume = t
        elif star != -1:
            # Let the last '*' absorb one more character and retry from there.
            resume += 1
            t = resume
            p = star
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)
