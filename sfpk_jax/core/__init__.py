"""The math of SFPK and of exact top-k masks, pure functions over lists of leaves.

Masks and layouts, channel and N:M masks, the density functional G, polarizers,
repulsion, the step direction, step-size schedules, the vote and top-k.
Nothing here knows about simulation state, files or devices.
"""
