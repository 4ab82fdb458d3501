"""How results print their numbers in words, the same on the overlay's banner and in the SR's
Impression, so a reader sees one value one way wherever they look."""

from __future__ import annotations


def probability_pair(probability: float, threshold: float) -> tuple[str, str]:
    """P(bone loss) and the threshold as text: two decimals, more where two would print both
    alike (0.4195 against 0.4217 is not "0.42 (threshold 0.42)"), and never a certainty the model
    does not claim ("> 0.99", not "1.00")."""
    digits = 2
    while digits < 4 and f"{probability:.{digits}f}" == f"{threshold:.{digits}f}":
        digits += 1
    top, bottom = 1 - 10**-digits, 10**-digits
    if f"{probability:.{digits}f}" == f"{threshold:.{digits}f}":  # still alike: say which side
        side = ">=" if probability >= threshold else "<"
        return f"{side} {threshold:.{digits}f}", f"{threshold:.{digits}f}"
    if probability > top:
        shown = f"> {top:.{digits}f}"
    elif probability < bottom:
        shown = f"< {bottom:.{digits}f}"
    else:
        shown = f"{probability:.{digits}f}"
    return shown, f"{threshold:.{digits}f}"


def t_score(value: float) -> str:
    """A T-score to one decimal with its sign; -0.04 is +0.0, not -0.0."""
    return f"{round(value, 1) + 0.0:+.1f}"


def percent_pair(probability: float, threshold: float) -> tuple[str, str]:
    """``probability_pair`` in percent ("72 %", "41.95 %", "> 99 %"): the same digits, so a
    probability never prints equal to the threshold it falls below, nor as a certainty."""
    shown, bar = probability_pair(probability, threshold)
    return _as_percent(shown), _as_percent(bar)


def _as_percent(text: str) -> str:
    sign, _, number = text.rpartition(" ")
    digits = len(number.partition(".")[2])
    value = f"{float(number) * 100:.{max(0, digits - 2)}f} %"
    return f"{sign} {value}" if sign else value
