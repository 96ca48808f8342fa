"""Preloaded by the loader workers' fork server (see `train.data`), and by nothing else.

Importing it makes the fork server die with the training process that started it: the
workers it forks hold the server's liveness pipe, so without this a training process killed
outright would leave the server and its workers waiting on each other for good.
"""

from __future__ import annotations

from train.data import die_with_parent

die_with_parent()
