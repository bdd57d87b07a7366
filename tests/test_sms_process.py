"""SMS in a whole cell, as a person sets it up: `pyserver run --smsc ... --short-codes ...`
bound to a simulated SMSC (smpp34's server), a phone registered with `pyserver admin
add-phone --sms all`, a chat texted to it, a text from it filed, and the figures on
/metrics."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.request
from pathlib import Path

from pyserver.discovery.client import connect_to_cluster
from pyserver.sms import concat, gsm
from tests.support import cli, free_port, run, serve_cell, start_serving
from tests.support.smsc import SimulatedSmsc


def test_a_cell_texts_a_chat_to_a_phone_and_files_its_answer(tmp_path: Path) -> None:
    data = str(tmp_path / "cell")

    async def scenario() -> None:
        smsc = await SimulatedSmsc(free_port()).start()
        proc, ready = await asyncio.to_thread(
            serve_cell, Path(data), None, "--smsc", f"127.0.0.1:{smsc.port}",
            "--short-codes", "12345=7",
        )  # fmt: skip
        try:
            await asyncio.wait_for(smsc.bound.wait(), 10)
            said = await asyncio.to_thread(
                cli, "admin", "add-phone", "--data", data, "--user", "1",
                "+15550001111", "--sms", "all",
            )  # fmt: skip
            assert "texts to +15550001111: all" in said
            sent = await asyncio.to_thread(
                cli, "send", "--data", data, "--user", "2", "--to", "1", "--json",
                "dinner at 8? ☃",
            )  # fmt: skip
            thread_id = json.loads(sent)["thread_id"]
            [submit] = await smsc.submitted()
            part = concat.read_part(bytes(submit.short_message), submit.esm_class)
            assert gsm.decode_body(part.body, submit.data_coding) == "user 2: dinner at 8? ☃"
            assert submit.data_coding == gsm.DATA_CODING_UCS2  # ☃ has no GSM code

            # the answer from the phone joins the conversation with user 2
            assert await smsc.text("+15550001111", "12345", b"yes!") == 0
            thread = json.loads(
                await asyncio.to_thread(
                    cli, "thread", "--data", data, "--user", "2", thread_id, "--json"
                )
            )
            assert [(m["sender"], m["channel"], m["text"]) for m in thread["messages"]] == [
                (2, "chat", "dinner at 8? ☃"),
                (1, "sms", "yes!"),
            ]
            metrics_url = f"http://127.0.0.1:{ready['http']['port']}/metrics"
            page = await asyncio.to_thread(
                lambda: urllib.request.urlopen(metrics_url, timeout=10).read().decode()
            )
            name = f'smsc="127.0.0.1:{smsc.port}"'
            assert f"pyserver_sms_bound{{{name}}} 1.0" in page
            assert f"pyserver_sms_submits_total{{{name}}} 1.0" in page
            assert 'pyserver_sms_texts_total{kind="replies"} 1.0' in page
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
            await smsc.stop()

    run(scenario, timeout=90)


def test_pyserver_sms_files_texts_for_a_cell_it_runs_beside(tmp_path: Path) -> None:
    data = str(tmp_path / "cell")

    async def scenario() -> None:
        smsc = await SimulatedSmsc(free_port()).start()
        cell, _ = await asyncio.to_thread(serve_cell, Path(data))
        gateway, _ = await asyncio.to_thread(
            start_serving,
            ["sms", "--data", data, "--port", "0", "--smsc", f"127.0.0.1:{smsc.port}",
             "--short-codes", "555=9"],
            tmp_path / "sms.json",
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert await smsc.text("+447700900123", "555", b"Hi! \x1b\x655?") == 0
            listed = await asyncio.to_thread(
                cli, "threads", "--data", data, "--user", "9", "--folder", "other",
                "--json",
            )  # fmt: skip
            [thread] = json.loads(listed)["threads"]
            assert thread["snippet"] == "Hi! €5?" and thread["channels"] == ["sms"]
            assert await smsc.text("+447700900123", "999", b"nobody's") != 0
        finally:
            for proc in (gateway, cell):
                proc.terminate()
                await asyncio.to_thread(proc.wait, 30)
            await smsc.stop()

    run(scenario, timeout=90)


def test_a_clusters_nodes_text_through_its_sms_gateway(tmp_path: Path, zookeeper: str) -> None:
    """`pyserver cluster up --smsc`: the SMS gateway (`pyserver sms`) holds the SMSC session,
    the app servers text their users' copies through it, and texts in and receipts reach
    each user's owner through discovery."""
    folder = str(tmp_path / "cluster")

    async def scenario() -> None:
        smsc = await SimulatedSmsc(free_port()).start()
        try:
            await asyncio.to_thread(
                cli, "cluster", "up", "--dir", folder, "--engine", "sqlite", "--cells", "1",
                "--nodes", "2", "--session-timeout", "3", "--smsc", f"127.0.0.1:{smsc.port}",
                "--short-codes", "12345=7",
            )  # fmt: skip
            state = json.loads(Path(folder, "cluster.json").read_text())
            assert [p["role"] for p in state["processes"]].count("sms") == 1
            await asyncio.wait_for(smsc.bound.wait(), 10)
            said = await asyncio.to_thread(
                cli, "admin", "add-phone", "--cluster", folder, "--user", "1",
                "+15550001111", "--sms", "all",
            )  # fmt: skip
            assert "texts to +15550001111: all" in said
            cluster = await connect_to_cluster(folder)
            try:
                sent = await cluster.send(2, [1], "on my way")
                [submit] = await smsc.submitted()
                assert bytes(submit.short_message) == gsm.encode_gsm("user 2: on my way")
                receipt = b"id:sim-1 sub:001 dlvrd:001 stat:DELIVRD err:000 text:on my"
                assert await smsc.text("+15550001111", "12345", receipt, esm_class=4) == 0
                assert await smsc.text("+15550001111", "12345", b"thanks") == 0
                thread = await cluster.get_thread(2, sent["thread_id"])
                assert [(m["sender"], m["channel"], m["text"]) for m in thread["messages"]] == [
                    (2, "chat", "on my way"),
                    (1, "sms", "thanks"),
                ]
                mine = (await cluster.get_thread(1, sent["thread_id"]))["messages"][0]
                assert mine["delivery"]["+15550001111"]["state"] == "delivered"
                # the gateway's /metrics: the submits it answered, timed, and its texts
                [sms] = [p for p in state["processes"] if p["role"] == "sms"]
                url = f"http://{sms['metrics']}/metrics"
                # the answer from the phone, filed (a reply to the text it got)
                filed = re.compile(
                    r'pyserver_sms_texts_total\{kind="(replies|texts_from_phones)"\} 1\.0'
                )
                for _ in range(100):  # counted once the text is filed: poll briefly
                    text = await asyncio.to_thread(
                        lambda: urllib.request.urlopen(url, timeout=10).read().decode()
                    )
                    if filed.search(text):
                        break
                    await asyncio.sleep(0.1)
                assert 'pyserver_requests_total{code="OK",op="SMS_SUBMIT"} 1.0' in text, text
                assert 'pyserver_request_seconds_count{op="SMS_SUBMIT"} 1.0' in text, text
                assert filed.search(text), [line for line in text.splitlines() if "texts" in line]
            finally:
                await cluster.close()
        finally:
            await asyncio.to_thread(cli, "cluster", "down", "--dir", folder, "--grace", "10")
            await smsc.stop()

    run(scenario, timeout=240)
