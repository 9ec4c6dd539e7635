"""One module per op: its torch.library ops (one per kernel stage and backend,
each with a fake implementation and autograd), and its public function."""
