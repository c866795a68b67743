"""Pure decisions (numbers in, numbers out): no torch import, table-tested."""
