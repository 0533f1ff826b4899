"""Progress in every log: plain lines at a wall interval when stdout is not a terminal, tqdm when it is."""
import io

from selfsup.progress import Progress, duration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_come_at_the_interval_with_step_fields_elapsed_and_eta():
    out, clock = io.StringIO(), Clock()
    p = Progress(100, "train", every_s=30, stream=out, clock=clock)
    assert p.bar is None                              # a StringIO is not a terminal
    p.set(epoch=0, loss=7.98765, lr=0.03, **{"views/s": 2266})
    for _ in range(10):                               # 10 steps in 25 s: no line yet
        clock.t += 2.5
        p.update()
    assert out.getvalue() == ""
    clock.t += 5.0                                    # 30 s, 11 steps: 89 left at 30/11 s each
    p.update()
    (line,) = out.getvalue().splitlines()
    assert line == ("[selfsup] train: step 11/100 (11%) epoch 0 loss 7.988 lr 0.03 views/s 2266 "
                    f"elapsed 30s eta {duration(30 / 11 * 89)}")
    clock.t += 10                                     # the next line is 30 s after the last one
    p.update()
    assert len(out.getvalue().splitlines()) == 1
    clock.t += 20
    p.update()
    assert out.getvalue().splitlines()[-1].startswith("[selfsup] train: step 13/100 (13%)")
    p.close()                                         # nothing done since the last line: no repeat
    assert len(out.getvalue().splitlines()) == 2


def test_close_prints_the_last_position_and_write_prints_at_once():
    out, clock = io.StringIO(), Clock()
    p = Progress(10, "linear", initial=4, every_s=30, stream=out, clock=clock, unit="epoch")
    p.write("epoch 4: knn_top1 0.8")
    clock.t += 5
    p.update(6)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "epoch 4: knn_top1 0.8"
    assert lines[1] == "[selfsup] linear: epoch 10/10 (100%) elapsed 5s eta 0s"


def test_reset_restarts_the_rate_from_the_new_position():
    out, clock = io.StringIO(), Clock()
    p = Progress(100, "train", every_s=1, stream=out, clock=clock)
    clock.t = 100.0
    p.update(10)                                      # slow start: 10 steps in 100 s
    p.reset(100, 50)                                  # a rollback or resume moves the count
    clock.t += 10
    p.update(10)                                      # 10 steps in 10 s: 40 left, 40 s
    assert out.getvalue().splitlines()[-1].endswith("step 60/100 (60%) elapsed 10s eta 40s")


def test_disabled_prints_nothing_and_a_terminal_gets_the_bar():
    out, clock = io.StringIO(), Clock()
    p = Progress(5, "train", every_s=0.1, enabled=False, stream=out, clock=clock)
    clock.t += 1
    p.update()
    p.write("hidden")
    p.close()
    assert out.getvalue() == ""
    bar = Progress(5, "train", every_s=0.1, stream=out, tty=True, clock=clock)
    assert bar.bar is not None
    clock.t += 1
    bar.update()
    bar.close()
    assert "[selfsup] train:" not in out.getvalue()   # the bar (on stderr), not the lines


def test_duration():
    assert [duration(s) for s in (0, 9.4, 60, 75, 3599, 3725, -3)] == ["0s", "9s", "1m00s", "1m15s", "59m59s",
                                                                       "1h02m", "0s"]


def test_training_into_a_log_shows_progress_lines(tiny_overrides, capsys):
    from selfsup.config import load_config
    from selfsup.engine.trainer import train

    train(load_config(None, tiny_overrides + ["train.max_steps=6", "train.log_every=2", "train.progress_s=1e-6",
                                              "eval.every=0"]))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[selfsup] train: step")]
    assert len(lines) == 6 and lines[-1].startswith("[selfsup] train: step 6/6 (100%) epoch 0 loss ")
    assert " lr " in lines[-1] and " views/s " in lines[-1] and " eta 0s" in lines[-1]


def test_linear_augment_and_finetune_show_progress_in_a_log(monkeypatch, capsys):
    import functools

    import torch

    import selfsup.eval.finetune as ft
    import selfsup.eval.linear as lin
    from selfsup.data.datasets import build_dataset
    from selfsup.models.backbones import SmallResNet

    for mod in (lin, ft):   # a line at every step instead of every 30 s
        monkeypatch.setattr(mod, "Progress", functools.partial(Progress, every_s=1e-9))
    torch.manual_seed(0)
    ds = build_dataset("synthetic", "train", image_size=16, num_samples=64, num_classes=4)
    test = build_dataset("synthetic", "test", image_size=16, num_samples=32, num_classes=4)
    enc = SmallResNet(width=4, cifar_stem=False)
    lin.linear_probe_augment(enc, ds, test, epochs=2, lr=1.0, batch_size=16, device="cpu")
    net = torch.nn.Sequential(enc, torch.nn.Linear(32, 4))
    ft.finetune(net, ds, torch.arange(32), epochs=2, lr=0.01, batch_size=16, device="cpu")
    out = capsys.readouterr().out.splitlines()
    linear = [ln for ln in out if ln.startswith("[selfsup] linear (augment): step ")]
    tune = [ln for ln in out if ln.startswith("[selfsup] finetune (32 labels): step ")]
    assert len(linear) == 8 and linear[-1].startswith("[selfsup] linear (augment): step 8/8 (100%) loss ")
    assert len(tune) == 4 and tune[-1].startswith("[selfsup] finetune (32 labels): step 4/4 (100%) loss ")


def test_quiet_close_prints_only_after_an_earlier_line():
    t = [0.0]
    out = io.StringIO()
    short = Progress(10, "features", stream=out, tty=False, clock=lambda: t[0], final_line=False)
    short.update(10)
    short.close()
    assert out.getvalue() == ""   # a short extraction says nothing
    long = Progress(10, "features", stream=out, tty=False, clock=lambda: t[0], final_line=False, unit="image")
    long.update(4)
    t[0] = 31.0
    long.update(4)
    long.update(2)
    long.close()
    lines = out.getvalue().splitlines()
    assert [x.split(" elapsed")[0] for x in lines] == ["[selfsup] features: image 8/10 (80%)",
                                                      "[selfsup] features: image 10/10 (100%)"]


def test_heartbeat_speaks_only_when_the_log_is_silent():
    import time

    from selfsup.progress import Heartbeat

    out = io.StringIO()
    with Heartbeat("eval knn", every_s=0.2, stream=out):
        time.sleep(0.7)
    silent = out.getvalue().splitlines()
    assert silent and all(x.startswith("[selfsup] eval knn: working, elapsed") for x in silent)
    out2 = io.StringIO()
    bar = Progress(100, "features", stream=out2, tty=False, every_s=0.05)
    with Heartbeat("eval knn", every_s=0.2, stream=out2):
        for _ in range(14):   # a progress line every 0.05 s: the heartbeat has nothing to add
            time.sleep(0.05)
            bar.update(1)
    assert out2.getvalue() and "working" not in out2.getvalue()

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    with Heartbeat("eval knn", every_s=0.05, stream=tty):
        time.sleep(0.2)
    assert tty.getvalue() == ""   # a terminal has its bars
