"""Interval arithmetic on ``(low, high)`` pairs of floats, for the static bounds on ``K``."""

from __future__ import annotations

INF = float("inf")
ALL = (-INF, INF)


def mul(a, b):
    products = [x * y for x in a for y in b if not ((x == 0 and abs(y) == INF) or (y == 0 and abs(x) == INF))]
    return (min(products, default=0.0), max(products, default=0.0))


def add(a, b):
    return (a[0] + b[0], a[1] + b[1])


def neg(a):
    return (-a[1], -a[0])


def union(*intervals):
    return (min(i[0] for i in intervals), max(i[1] for i in intervals))
