"""Plans: blocks as units in order, and how the ratio is split between groups and widths."""

from fxflatten import capture, discover_blocks
from fxflatten.plans import plan_blocks, split_plans, units_of
from tests.models import Shape, build


def test_units_keep_block_order():
    assert units_of([[1, 2], [4, 5, 6]], 8) == [(0,), (1, 2), (3,), (4, 5, 6), (7,)]


def test_split_plans_prune_nothing_else_when_the_groups_take_the_whole_ratio():
    dense_map = discover_blocks(capture(build("llama", Shape(layers=4))))
    ratio = dense_map.blocks[1].parameters / dense_map.total_parameters
    assert split_plans(dense_map, [[1, 2]], ratio) == plan_blocks(dense_map, [[1, 2]])
    widths = {plan.width for plan in split_plans(dense_map, [[1, 2]], 2 * ratio) if len(plan.origin) == 1}
    assert len(widths) == 1 and widths.pop() < dense_map.blocks[0].mlp[0].mlp.width  # spread evenly
