"""The chaos soak's checker (bench.chaos_check) on histories made by hand: a clean one
passes, and each planted fault (a lost copy, a doubled one, a gap, a fork, a read going
back in time, a count that disagrees with the log, a stale owner's write, a user never
served again) is caught and counted."""

from __future__ import annotations

from typing import Any

from bench.chaos_check import (
    AckedWrite,
    History,
    PositionedWrite,
    Read,
    Recovery,
    check,
    replayed_counts,
)


def added(seq: int, message_id: str, sender: int, key: str, participants: list[int]) -> dict:
    return {
        "seq": seq, "ts": seq, "action": "message_added", "message_id": message_id,
        "thread_id": "t" + "-".join(map(str, sorted(participants))), "sender": sender,
        "participants": participants, "folder": "inbox", "channel": "chat", "subject": "",
        "snippet": "hi", "unread": True, "key": key,
    }  # fmt: skip


def moved(seq: int, thread_id: str, folder: str) -> dict:
    return {"seq": seq, "ts": seq, "action": "moved", "thread_id": thread_id, "folder": folder}


def clean() -> tuple[History, dict[int, list[dict[str, Any]]]]:
    logs = {
        1: [added(1, "m1", 1, "k1", [1, 2]), moved(2, "t1-2", "archived")],
        2: [added(1, "m1", 1, "k1", [1, 2]), added(2, "m2", 0, "<mail@x>", [2])],
    }
    history = History(
        writes=[
            AckedWrite(1, "k1", (1, 2)),
            AckedWrite(0, "<mail@x>", (2,), kind="mail"),
        ],
        positioned=[
            PositionedWrite(1, 2, "moved", "t1-2", "archived"),
            PositionedWrite(1, 1, "moved", "t1-2", "inbox"),  # changed nothing
        ],
        reads=[
            Read("r1", 2, 1, 1, frozenset({"m1"})),
            Read("r1", 2, 2, 2, frozenset({"m1", "m2"})),
            Read("r2", 2, 1, 1, frozenset()),
        ],
        recoveries=[Recovery("kill", {1: 0.5, 2: 1.25}), Recovery("kill", {1: 2.0})],
    )
    return history, logs


def test_a_clean_history_has_nothing_to_report() -> None:
    history, logs = clean()
    counts = {user: replayed_counts(entries) for user, entries in logs.items()}
    report = check(history, logs, counts)
    for figure in ("lost_writes", "doubled_writes", "gaps", "forks", "monotonic_violations",
                   "stale_owner_writes", "count_mismatches"):  # fmt: skip
        assert report[figure] == 0, (figure, report)
    assert report["examples"] == {}
    assert report["max_unavailable_s"] == {"kill": 2.0}
    assert report["counts_checked"] == 2


def test_a_lost_copy_is_caught() -> None:
    history, logs = clean()
    logs[2] = [added(1, "m2", 0, "<mail@x>", [2])]  # the SEND's copy for user 2 is gone
    report = check(history, logs)
    assert report["lost_writes"] == 1
    assert "1:k1 missing from user 2" in report["examples"]["lost"][0]


def test_a_doubled_copy_is_caught_acknowledged_or_not() -> None:
    history, logs = clean()
    logs[2].append(added(3, "m1b", 1, "k1", [1, 2]))  # the same key stored again
    logs[1].append(added(3, "m9", 1, "k9", [1]))
    logs[1].append(added(4, "m9", 1, "k9", [1]))  # never acknowledged, stored twice
    report = check(history, logs)
    assert report["doubled_writes"] == 3  # k1 twice; k9 twice and m9 twice


def test_a_gap_and_a_fork_are_caught() -> None:
    history, logs = clean()
    logs[1][1] = {**logs[1][1], "seq": 3}
    report = check(history, logs)
    assert report["gaps"] == 1
    history, logs = clean()
    logs[1][1] = moved(2, "another", "archived")  # the acknowledged move is not at 2
    assert check(history, logs)["forks"] == 1
    history, logs = clean()
    history.positioned.append(PositionedWrite(1, 1, "moved", "t1-2", "archived"))
    assert check(history, logs)["forks"] == 1  # at 1 the thread was in the inbox
    history, logs = clean()
    history.reads.append(Read("r3", 2, 1, 1, frozenset({"m2"})))  # m2 came at 2, not by 1
    history.reads.append(Read("r3", 1, 2, 7, frozenset()))  # past the log's end
    assert check(history, logs)["forks"] == 2


def test_a_read_going_back_in_time_is_caught_per_client() -> None:
    history, logs = clean()
    history.reads.append(Read("r1", 2, 3, 1, frozenset({"m1"})))  # r1 had read 2 already
    report = check(history, logs)
    assert report["monotonic_violations"] == 1
    assert "at 2, then at 1" in report["examples"]["monotonic"][0]


def test_counts_that_disagree_with_the_log_are_caught() -> None:
    history, logs = clean()
    counts = {user: replayed_counts(entries) for user, entries in logs.items()}
    assert counts[2]["inbox"]["unread"] == 2  # two threads, each with an unread message
    counts[2]["inbox"]["unread"] = 3
    assert check(history, logs, counts)["count_mismatches"] == 1


def test_stale_owner_writes_and_users_never_served_again_are_reported() -> None:
    history, logs = clean()
    history.stale_owner_acks, history.stale_owner_tries = 2, 5
    history.recoveries.append(Recovery("zookeeper", {1: 0.1, 2: None}))
    report = check(history, logs)
    assert report["stale_owner_writes"] == 2 and report["stale_owner_tries"] == 5
    assert report["max_unavailable_s"] == {"kill": 2.0, "zookeeper": None}
