"""The order ``torch.sort(x, descending=True)`` gives on CPU, ties included.

PyTorch's CPU sort (``ATen/native/cpu/SortingKernel.cpp``) sorts (value, index) pairs with
``std::sort`` and the comparator ``a > b`` (NaN first) unless ``stable=True``. With GCC's
libstdc++ (the Linux wheels) ``std::sort`` is introsort (``bits/stl_algo.h``): quicksort with a
median-of-three pivot moved to the front and an unguarded Hoare partition while a range holds
more than 16 elements, heapsort once the depth exceeds ``2·floor(log2 n)``, then one insertion
sort pass. Equal values therefore come out in an order that depends on the whole array.
DeepSeek's ``eplb.py`` sorts per-copy loads this way, and all copies of an expert tie, so its
``log2phy`` (which copy sits in which slot) follows this order; :func:`sort_desc` reproduces it
(tested against torch 2.13 on random tie-heavy arrays). Pure Python, ``O(n log n)``; used only
where the order of equal values is part of the answer.
"""

from __future__ import annotations

import numpy as np


def sort_desc(values: np.ndarray) -> np.ndarray:
    """Indices that sort ``values`` (1-D, no NaN) in descending order, as torch's CPU sort."""
    a = [(float(x), i) for i, x in enumerate(np.asarray(values).tolist())]
    n = len(a)
    if n:
        _introsort(a, 0, n, (n.bit_length() - 1) * 2)
        _final_insertion_sort(a, n)
    return np.array([i for _, i in a], dtype=np.int64)


def _introsort(a: list, first: int, last: int, depth: int) -> None:
    while last - first > 16:
        if depth == 0:
            _heapsort(a, first, last)
            return
        depth -= 1
        _median_to_first(a, first, first + 1, first + (last - first) // 2, last - 1)
        cut = _partition(a, first + 1, last, first)
        _introsort(a, cut, last, depth)
        last = cut


def _median_to_first(a: list, result: int, i: int, j: int, k: int) -> None:
    x, y, z = a[i][0], a[j][0], a[k][0]
    if x > y:
        pick = j if y > z else (k if x > z else i)
    else:
        pick = i if x > z else (k if y > z else j)
    a[result], a[pick] = a[pick], a[result]


def _partition(a: list, first: int, last: int, pivot: int) -> int:
    p = a[pivot][0]
    while True:
        while a[first][0] > p:
            first += 1
        last -= 1
        while p > a[last][0]:
            last -= 1
        if not first < last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def _adjust_heap(a: list, first: int, hole: int, length: int, value: tuple) -> None:
    top = child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if a[first + child][0] > a[first + child - 1][0]:
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and a[first + parent][0] > value[0]:
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _heapsort(a: list, first: int, last: int) -> None:
    n = last - first
    if n < 2:
        return
    for parent in range((n - 2) // 2, -1, -1):
        _adjust_heap(a, first, parent, n, a[first + parent])
    while last - first > 1:
        last -= 1
        value = a[last]
        a[last] = a[first]
        _adjust_heap(a, first, 0, last - first, value)


def _linear_insert(a: list, last: int) -> None:
    val = a[last]
    nxt = last - 1
    while val[0] > a[nxt][0]:
        a[last] = a[nxt]
        last, nxt = nxt, nxt - 1
    a[last] = val


def _final_insertion_sort(a: list, n: int) -> None:
    head = min(n, 16)
    for i in range(1, head):
        if a[i][0] > a[0][0]:
            val = a[i]
            a[1:i + 1] = a[0:i]
            a[0] = val
        else:
            _linear_insert(a, i)
    for i in range(head, n):
        _linear_insert(a, i)
