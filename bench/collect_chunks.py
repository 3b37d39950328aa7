"""What collect's progress chunks cost: a Q-learning teacher's 20,000 steps in one train_steps call
against chunks of 2,048 (collect.PROGRESS_STEPS), paired teacher by teacher, recording included.

    python bench/collect_chunks.py     # prints both times for 3 repeats of 20 Dark Room teachers and the ratio
"""
import statistics
import time

from pipeline.config import load_preset
from pipeline.plan import teacher_specs
from pipeline.schema import Transitions
from pipeline.teachers import make_teacher
p = load_preset("quick", ["collect.teachers.darkroom.budget=20000", "collect.teachers.darkroom.algo_config={learning_rate: 0.1, epsilon_decay: 0.8}"])
specs = [s for s in teacher_specs(p) if s.group == "darkroom"][:20]
def run(spec, chunk):
    t = make_teacher(spec.algo, spec.env_id, spec.env_kwargs, seed=spec.seed, budget=spec.budget, config=spec.algo_config)
    s = time.perf_counter(); rows = []
    while t.step < spec.budget:
        rows.append(t.train_steps(min(chunk, spec.budget - t.step)))
    Transitions.concat(rows).to_table(t.encoding, teacher_id="x", env_id="e", task_id="t", seed=0)
    return time.perf_counter() - s
one, ten = [], []
for r in range(3):
    a = b = 0.0
    for spec in specs:
        a += run(spec, 20000); b += run(spec, 2048)
    one.append(a); ten.append(b)
print("one call", [round(x,2) for x in one], "chunks of 2048", [round(x,2) for x in ten], "ratio", round(statistics.median(ten)/statistics.median(one),3))
