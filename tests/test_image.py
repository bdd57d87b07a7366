"""UserImage: every log action, counts, replay equivalence, snapshots (pure logic, no store)."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyserver import implementation
from pyserver.app.image import FOLDERS, SnapshotOutdated, UserImage, scoped_key, thread_id_for
from pyserver.errors import LogCorrupt

T1 = thread_id_for([1, 2])
T2 = thread_id_for([1, 3])


def added(seq: int, message_id: str, thread_id: str = T1, **fields: Any) -> dict[str, Any]:
    entry = {
        "seq": seq,
        "ts": 1_000 + seq,
        "action": "message_added",
        "message_id": message_id,
        "thread_id": thread_id,
        "sender": 2,
        "participants": [1, 2],
        "channel": "chat",
        "folder": "inbox",
        "unread": True,
        "subject": "",
        "snippet": f"text of {message_id}",
        "body_ref": message_id,
        "key": "",
    }
    entry.update(fields)
    return entry


def entry(seq: int, action: str, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "ts": 1_000 + seq, "action": action, **fields}


def replay(entries: list[dict[str, Any]], image: UserImage | None = None) -> UserImage:
    image = image or UserImage()
    for item in entries:
        image.apply(item, _body(item))
    return image


def _body(item: dict[str, Any]) -> dict[str, Any] | None:
    if item["action"] != "message_added":
        return None
    return {"text": f"body {item['message_id']}", "from": None, "extra": {"n": item["seq"]}}


def counts(image: UserImage, folder: str) -> tuple[int, int]:
    c = image.counts()[folder]
    return c["unread"], c["unseen"]


# ---- thread ids ----


def test_thread_id_ignores_order_and_repeats_of_participants() -> None:
    assert thread_id_for([3, 1, 2]) == thread_id_for([1, 2, 3, 3])
    assert thread_id_for([1, 2]) != thread_id_for([1, 2, 3])


def test_thread_id_includes_the_outside_address_case_insensitively() -> None:
    base = thread_id_for([2])
    alice = thread_id_for([2], "alice@example.org")
    assert alice != base
    assert thread_id_for([2], " Alice@Example.ORG ") == alice
    assert thread_id_for([2], "bob@example.org") != alice


# ---- each action ----


def test_message_added_creates_a_thread_with_its_summary_and_counts() -> None:
    image = UserImage()
    base_weight = image.weight
    image.apply(added(1, "m1", subject="Hello", channel="email"), {"text": "hi there",
                "from": "alice@example.org", "extra": {"h": 1}})  # fmt: skip
    thread = image.threads[T1]
    assert image.seq == 1
    assert thread.to_summary() == {
        "thread_id": T1, "participants": [1, 2], "folder": "inbox", "subject": "Hello",
        "snippet": "text of m1", "last_ts": 1_001, "messages": 1, "unread": 1,
        "channels": ["email"],
    }  # fmt: skip
    assert image.messages["m1"].to_dict(with_extra=True) == {
        "message_id": "m1", "thread_id": T1, "sender": 2, "from": "alice@example.org",
        "channel": "email", "ts": 1_001, "subject": "Hello", "text": "hi there",
        "unread": True, "extra": {"h": 1},
    }  # fmt: skip
    assert counts(image, "inbox") == (1, 1)
    assert image.weight > base_weight


def test_a_second_message_updates_the_summary_but_counts_the_thread_once() -> None:
    image = replay([added(1, "m1", subject="First"), added(2, "m2", subject="Re", channel="sms")])
    thread = image.threads[T1]
    assert [m.message_id for m in thread.messages.values()] == ["m1", "m2"]
    assert thread.subject == "First"
    assert thread.snippet == "text of m2"
    assert thread.last_ts == 1_002
    assert thread.channels == {"chat", "sms"}
    assert thread.unread == 2
    assert counts(image, "inbox") == (1, 1)


def test_message_added_moves_the_thread_to_the_entrys_folder() -> None:
    image = replay([added(1, "m1", folder="other"), added(2, "m2", folder="inbox")])
    assert image.threads[T1].folder == "inbox"
    assert counts(image, "other") == (0, 0)
    assert counts(image, "inbox") == (1, 1)


def test_own_message_is_neither_unread_nor_unseen() -> None:
    image = replay([added(1, "m1", sender=1, unread=False, folder="sent")])
    assert counts(image, "sent") == (0, 0)
    assert image.threads[T1].unseen is False


def test_a_missing_body_leaves_the_snippet_as_text() -> None:
    image = UserImage()
    image.apply(added(1, "m1"))
    assert image.messages["m1"].text == "text of m1"
    assert image.messages["m1"].sender_address is None
    assert image.messages["m1"].extra == {}


def test_marked_read_and_unread_whole_thread_and_one_message() -> None:
    image = replay([added(1, "m1"), added(2, "m2")])
    image.apply(entry(3, "marked_read", thread_id=T1, message_id="m1"))
    assert image.threads[T1].unread == 1
    assert counts(image, "inbox") == (1, 1)
    image.apply(entry(4, "marked_read", thread_id=T1, message_id=""))
    assert image.threads[T1].unread == 0
    assert not image.messages["m2"].unread
    assert counts(image, "inbox") == (0, 1)
    image.apply(entry(5, "marked_unread", thread_id=T1, message_id="m2"))
    assert counts(image, "inbox") == (1, 1)
    image.apply(entry(6, "marked_unread", thread_id=T1, message_id=""))
    assert image.threads[T1].unread == 2


def test_moved_carries_the_counts_to_the_new_folder() -> None:
    image = replay([added(1, "m1"), entry(2, "moved", thread_id=T1, folder="archived")])
    assert image.threads[T1].folder == "archived"
    assert counts(image, "inbox") == (0, 0)
    assert counts(image, "archived") == (1, 1)


def test_message_deleted_recomputes_the_summary() -> None:
    image = replay([added(1, "m1", subject="S", channel="email"), added(2, "m2")])
    image.apply(entry(3, "message_deleted", thread_id=T1, message_id="m2"))
    thread = image.threads[T1]
    assert list(thread.messages) == ["m1"]
    assert "m2" not in image.messages
    assert thread.snippet == "text of m1"
    assert thread.last_ts == 1_001
    assert thread.channels == {"email"}
    assert thread.unread == 1


def test_a_threads_outside_addresses_follow_its_messages() -> None:
    """Who from outside a conversation wrote to its users and who they wrote to: kept as
    messages come (the first spelling of an address wins), gone with the last message
    that named it, and the same from a snapshot."""

    def mail(seq: int, message_id: str, sender: int, address: str | None, to: list[str]):
        item = added(seq, message_id, sender=sender, channel="email")
        body = {"text": "t", "from": address, "extra": {"to_addresses": to} if to else {}}
        return item, body

    image = UserImage()
    for item, body in (
        mail(1, "m1", 0, "Alice@Outside.example", []),
        mail(2, "m2", 1, "u1@cell", ["alice@outside.example", "Bob@elsewhere.example"]),
        mail(3, "m3", 0, "carol@third.example", []),
        mail(4, "m4", 2, "u2@cell", []),  # a user's own: not outside
    ):
        image.apply(item, body)
    thread = image.threads[T1]
    expected = ["Alice@Outside.example", "Bob@elsewhere.example", "carol@third.example"]
    assert thread.outside_addresses() == expected
    copy = UserImage.from_snapshot(image.to_snapshot())
    assert copy.threads[T1].outside_addresses() == expected and copy.differences(image) == []
    image.apply(entry(5, "message_deleted", thread_id=T1, message_id="m3"))
    assert thread.outside_addresses() == expected[:2]
    image.apply(entry(6, "message_deleted", thread_id=T1, message_id="m1"))
    assert thread.outside_addresses() == ["alice@outside.example", "Bob@elsewhere.example"]


def test_deleting_the_last_message_deletes_the_thread_and_its_weight() -> None:
    empty = UserImage().weight
    image = replay([added(1, "m1")])
    image.apply(entry(2, "message_deleted", thread_id=T1, message_id="m1"))
    assert image.threads == {}
    assert image.messages == {}
    assert counts(image, "inbox") == (0, 0)
    assert image.weight == empty


def test_thread_deleted_removes_every_message_and_count() -> None:
    image = replay([added(1, "m1"), added(2, "m2"), added(3, "m3", T2, participants=[1, 3])])
    image.apply(entry(4, "thread_deleted", thread_id=T1))
    assert list(image.threads) == [T2]
    assert list(image.messages) == ["m3"]
    assert counts(image, "inbox") == (1, 1)


def test_blocked_and_unblocked() -> None:
    image = replay([entry(1, "sender_blocked", sender=7), entry(2, "sender_blocked", sender=8)])
    assert image.blocked == {7, 8}
    image.apply(entry(3, "sender_unblocked", sender=7))
    assert image.blocked == {8}


def test_folder_seen_clears_unseen_of_that_folder_only() -> None:
    image = replay(
        [
            added(1, "m1"),
            added(2, "m2", T2, participants=[1, 3], folder="other"),
            entry(3, "folder_seen", folder="inbox"),
        ]
    )
    assert counts(image, "inbox") == (1, 0)
    assert counts(image, "other") == (1, 1)
    image.apply(added(4, "m4"))
    assert counts(image, "inbox") == (1, 1)


def test_keys_are_scoped_by_sender_and_outlive_the_message() -> None:
    image = replay([added(1, "m1", key="k", sender=2), added(2, "m2", T2, key="k", sender=3)])
    assert image.key_result(2, "k") == ["m1", T1, 1_001, "inbox"]
    assert image.key_result(3, "k") == ["m2", T2, 1_002, "inbox"]
    assert image.key_result(4, "k") is None
    assert scoped_key(2, "k") in image.keys
    image.apply(entry(3, "thread_deleted", thread_id=T1))
    assert image.key_result(2, "k") == ["m1", T1, 1_001, "inbox"]


def test_entries_about_missing_things_only_advance_seq() -> None:
    image = replay([added(1, "m1")])
    before = image.to_snapshot()
    image.apply(entry(2, "marked_read", thread_id="nope", message_id=""))
    image.apply(entry(3, "moved", thread_id="nope", folder="spam"))
    image.apply(entry(4, "message_deleted", thread_id=T1, message_id="nope"))
    image.apply(entry(5, "thread_deleted", thread_id="nope"))
    image.apply(added(6, "m1"))  # the same message id again
    assert image.seq == 6
    assert UserImage.from_snapshot(before).threads.keys() == image.threads.keys()
    assert len(image.threads[T1].messages) == 1


def test_apply_refuses_a_gap_and_an_unknown_action() -> None:
    image = replay([added(1, "m1")])
    with pytest.raises(LogCorrupt, match="does not follow"):
        image.apply(added(3, "m3"))
    with pytest.raises(LogCorrupt, match="unknown action"):
        image.apply(entry(2, "exploded"))
    assert image.seq == 1


# ---- snapshots ----


def test_snapshot_round_trip_keeps_everything() -> None:
    image = replay(
        [
            added(1, "m1", key="k", subject="S"),
            added(2, "m2", T2, participants=[1, 3]),
            entry(3, "sender_blocked", sender=9),
            entry(4, "moved", thread_id=T2, folder="spam"),
            entry(5, "marked_read", thread_id=T1, message_id="m1"),
            entry(6, "folder_seen", folder="spam"),
        ]
    )
    copy = UserImage.from_snapshot(image.to_snapshot())
    assert copy == image
    assert copy.counts() == image.counts()
    assert copy.weight == image.weight
    assert copy.messages["m1"].to_dict(with_extra=True) == image.messages["m1"].to_dict(True)
    assert copy.differences(image) == []


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b'{"version": 2, "seq": 0}', b'{"version": 1, "seq": 0}',
     b'{"version": 1, "seq": 1, "blocked": [], "keys": {}, "threads": [{"id": "t"}]}'],
)  # fmt: skip
def test_a_bad_snapshot_is_log_corrupt(data: bytes) -> None:
    with pytest.raises(LogCorrupt):
        UserImage.from_snapshot(data)


def test_differences_name_what_differs() -> None:
    left = replay([added(1, "m1")])
    right = replay([added(1, "m1", folder="other")])
    found = left.differences(right)
    assert any("folder" in line for line in found), found
    assert left != right


# ---- replay equivalence on random logs ----

THREADS = [thread_id_for([1, n]) for n in (2, 3, 4)]
MESSAGES = [f"m{n}" for n in range(8)]


@st.composite
def logs(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Random entries over a few threads and messages, so actions hit existing things."""
    out: list[dict[str, Any]] = []
    for seq in range(1, draw(st.integers(0, 40)) + 1):
        action = draw(
            st.sampled_from(
                ["message_added"] * 4
                + [
                    "marked_read",
                    "marked_unread",
                    "moved",
                    "message_deleted",
                    "thread_deleted",
                    "sender_blocked",
                    "sender_unblocked",
                    "folder_seen",
                ]
            )
        )
        tid = draw(st.sampled_from(THREADS))
        mid = draw(st.sampled_from(MESSAGES))
        folder = draw(st.sampled_from(FOLDERS))
        added_ids = [m["message_id"] for m in out if "body_ref" in m]
        if action == "message_added":
            fields = {
                "folder": folder,
                "unread": draw(st.booleans()),
                "channel": draw(st.sampled_from(["chat", "email", "sms", "web"])),
                "subject": draw(st.sampled_from(["", "a", "b"])),
                "key": draw(st.sampled_from(["", "k1", "k2"])),
                "sender": draw(st.integers(1, 3)),
            }
            out.append(added(seq, f"{mid}-{seq}", tid, **fields))
        elif action in ("marked_read", "marked_unread"):
            target = draw(st.sampled_from(["", *added_ids]))
            out.append(entry(seq, action, thread_id=tid, message_id=target))
        elif action == "moved":
            out.append(entry(seq, action, thread_id=tid, folder=folder))
        elif action == "message_deleted":
            target = draw(st.sampled_from(["x", *added_ids]))
            out.append(entry(seq, action, thread_id=tid, message_id=target))
        elif action == "thread_deleted":
            out.append(entry(seq, action, thread_id=tid))
        elif action == "folder_seen":
            out.append(entry(seq, action, folder=folder))
        else:
            out.append(entry(seq, action, sender=draw(st.integers(1, 3))))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log=logs(), data=st.data())
def test_replay_from_a_snapshot_equals_replay_from_empty(
    log: list[dict[str, Any]], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(log)))
    full = replay(log)
    middle = UserImage.from_snapshot(replay(log[:cut]).to_snapshot())
    resumed = replay(log[cut:], middle)
    assert resumed == full, resumed.differences(full)
    assert resumed.weight == full.weight
    # the incremental counts are what a recount from scratch says
    assert full.counts() == full.recount()
    assert resumed.to_snapshot() == full.to_snapshot()
    # each folder's activity order is what sorting its threads says
    for folder in FOLDERS:
        in_folder = [t for t in full.threads.values() if t.folder == folder]
        expected = sorted(in_folder, key=lambda t: t.last_seq, reverse=True)
        assert full.newest_threads(folder, 1_000)[0] == expected


def test_newest_threads_pages_by_activity() -> None:
    tids = [thread_id_for([1, n]) for n in range(2, 7)]
    image = replay([added(n, f"m{n}", tids[n - 1]) for n in range(1, 6)])
    image.apply(added(6, "m6", tids[0]))  # the first thread becomes the newest
    image.apply(entry(7, "moved", thread_id=tids[2], folder="spam"))
    page, more = image.newest_threads("inbox", 2)
    assert [t.thread_id for t in page] == [tids[0], tids[4]] and more
    page, more = image.newest_threads("inbox", 2, before=page[-1].last_seq)
    assert [t.thread_id for t in page] == [tids[3], tids[1]] and not more
    assert image.newest_threads("spam", 5) == ([image.threads[tids[2]]], False)
    image.apply(entry(8, "message_deleted", thread_id=tids[0], message_id="m6"))
    assert [t.thread_id for t in image.newest_threads("inbox", 9)[0]] == [
        tids[4], tids[3], tids[1], tids[0]
    ]  # fmt: skip


# ---- through the log codec, native and pure ----


@pytest.fixture(params=["native", "pure"])
def codec(request: pytest.FixtureRequest) -> Any:
    if request.param == "native":
        if implementation.PURE_FORCED:
            pytest.skip("PYSERVER_PURE=1 forces the pure twin")
        return importlib.import_module("pyserver._native")
    return importlib.import_module("pyserver.pure.logcodec")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(log=logs())
def test_entries_through_the_codec_give_the_same_image(
    codec: Any, log: list[dict[str, Any]]
) -> None:
    decoded = [codec.decode(codec.encode(item)) for item in log]
    assert replay(decoded) == replay(log)


# ---- UIDs of messages in their folders (IMAP) ----


def _uids(image: UserImage, folder: str) -> list[tuple[int, str]]:
    return [(m.uid, m.message_id) for m in image.folder_messages(folder)]


def test_messages_get_increasing_uids_in_their_folder_and_new_ones_when_their_thread_moves() -> (
    None
):
    entries = [
        added(1, "m1"),
        added(2, "m2"),
        added(3, "n1", T2, participants=[1, 3]),
        entry(4, "moved", thread_id=T1, folder="archived"),
        added(5, "n2", T2, participants=[1, 3]),
        entry(6, "message_deleted", thread_id=T2, message_id="n1"),
        # a new message brings the archived thread back: all of it, with new UIDs
        added(7, "m3", folder="inbox"),
        entry(8, "moved", thread_id=T1, folder="inbox"),  # already there: nothing changes
    ]
    image = replay(entries[:4])
    assert _uids(image, "inbox") == [(3, "n1")]
    assert _uids(image, "archived") == [(1, "m1"), (2, "m2")]
    image = replay(entries[4:], image)
    assert _uids(image, "archived") == []
    assert _uids(image, "inbox") == [(4, "n2"), (5, "m1"), (6, "m2"), (7, "m3")]
    assert image.uid_next == {**dict.fromkeys(FOLDERS, 1), "inbox": 8, "archived": 3}
    # the same on every replay, and through a snapshot
    assert replay(entries) == image
    restored = UserImage.from_snapshot(image.to_snapshot())
    assert restored == image and _uids(restored, "inbox") == _uids(image, "inbox")
    assert restored.uid_next == image.uid_next


def test_a_messages_modseq_is_the_log_position_that_last_changed_it_for_imap() -> None:
    entries = [
        added(1, "m1"),
        added(2, "m2"),
        entry(3, "marked_read", thread_id=T1, message_id="m1"),
        entry(4, "marked_read", thread_id=T1, message_id="m1"),  # read already: no change
        entry(5, "folder_seen", folder="inbox"),  # not a flag
        added(6, "n1", T2, participants=[1, 3]),
        entry(7, "moved", thread_id=T2, folder="archived"),
        entry(8, "marked_unread", thread_id=T1, message_id=""),  # the whole thread
    ]
    image = replay(entries[:5])
    assert {m: image.messages[m].modseq for m in ("m1", "m2")} == {"m1": 3, "m2": 2}
    image = replay(entries[5:], image)
    assert {m: message.modseq for m, message in image.messages.items()} == {
        "m1": 8, "m2": 2, "n1": 7,
    }  # fmt: skip
    assert replay(entries) == image
    restored = UserImage.from_snapshot(image.to_snapshot())
    assert restored == image and restored.messages["n1"].modseq == 7


def test_an_older_snapshot_is_replayed_from_the_log_not_called_corrupt() -> None:
    old = b'{"version": 1, "seq": 1, "blocked": [], "keys": {}, "threads": []}'
    with pytest.raises(SnapshotOutdated):
        UserImage.from_snapshot(old)
    with pytest.raises(SnapshotOutdated):  # no MODSEQs
        UserImage.from_snapshot(old.replace(b'"version": 1', b'"version": 2'))
