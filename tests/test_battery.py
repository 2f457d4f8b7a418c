"""The hostile-input battery (tests/battery.py): every bad input or fault through the CLI gives one clear
error line or is survived, and no file that existed before is changed."""

import pytest

from battery import run_battery, table


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return run_battery(tmp_path_factory.mktemp("battery"))


def test_the_battery_has_at_least_thirty_kinds(rows):
    assert len({r.kind for r in rows}) == len(rows) >= 30


def test_every_row_is_a_clear_error_or_survived_and_loses_no_data(rows):
    print(table(rows))
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n" + table(bad)
