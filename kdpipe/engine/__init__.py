"""The training engine shared by teacher and student training.

- ``plan``: each epoch's order, replayed views and view parameters (pure functions of seed
  and epoch);
- ``data``: images on the device (or decoded per batch) in the plan's order;
- ``rows``: where cached targets live (device, host, stream);
- ``sources``: target sources (none, cached, online) behind one interface;
- ``loop``: the epoch loop, the step, evaluation, resume;
- ``fidelity``: cached targets against the online teacher;
- ``device`` and ``schedule``: devices, memory budgets, mixed precision; SGD and its steps.
"""
