"""Synthetic arithmetic word problems in GSM8K's format, generated offline from a seed.

Each problem is a short story of `steps` operations on a quantity; the reference solution
writes every computation as a calculator call `<<a*b=c>>` (rendered, like GSM8K, as python
and python_output parts) and ends with `#### answer`, so the same grading, the same RL reward
and the same tool-use rendering apply. Knobs set the difficulty: the number of operations,
the size of the numbers, and which operations appear.
"""

from nanopipe.tasks.common import SyntheticTask
from nanopipe.tasks.gsm8k import answer_to_parts, grade_final_answer

NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor", "Wen", "Yara", "Zane"]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "coins", "stamps", "shells", "cards",
         "eggs", "flowers", "buttons", "crayons", "beads"]

# (sentence in the question, sentence in the solution before the computation); {n} name, {x} item, {b} operand
ADD = [("{n} buys {b} more {x}.", "After buying {b} more, {n} has"),
       ("A friend gives {n} {b} more {x}.", "With the {b} from the friend, {n} has"),
       ("{n} finds {b} more {x}.", "After finding {b} more, {n} has")]
SUB = [("{n} gives {b} {x} to a friend.", "After giving away {b}, {n} has"),
       ("{n} uses {b} of the {x}.", "After using {b}, {n} has"),
       ("{n} loses {b} {x}.", "After losing {b}, {n} has")]
MUL = [("Then the number of {x} {n} has becomes {b} times as large.", "{b} times as many is"),
       ("Then {n} collects until there are {b} times as many {x}.", "{b} times as many is")]
DIV = [("{n} splits the {x} into {b} equal piles and keeps one pile.", "One of {b} equal piles is"),
       ("{n} shares the {x} equally among {b} people, {n} included, and keeps one share.", "One share of {b} is")]


def calculator_output(expr):
    """What the Engine's calculator tool prints for `expr` (plain Python arithmetic: 84/4 -> 21.0)."""
    return str(eval(expr, {"__builtins__": {}}, {}))


class Arithmetic(SyntheticTask):

    def __init__(self, size=1000, split="train", min_steps=1, max_steps=3, max_number=100, max_factor=9,
                 ops="+-*/", **kwargs):
        super().__init__(size, split, **kwargs)
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"Arithmetic needs 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
        if max_number < 2 or max_factor < 2:
            raise ValueError(f"Arithmetic needs max_number >= 2 and max_factor >= 2, got {max_number}, {max_factor}")
        if not set(ops) <= set("+-*/") or not set(ops) & set("+*"):
            raise ValueError(f"Arithmetic ops must be drawn from '+-*/' and include '+' or '*' (always applicable), got {ops!r}")
        self.min_steps, self.max_steps = min_steps, max_steps
        self.max_number, self.max_factor = max_number, max_factor
        self.ops = "".join(sorted(set(ops), key="+-*/".index))

    def get_example(self, index):
        rng = self.example_rng(index)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        steps = rng.randint(self.min_steps, self.max_steps)
        question, solution = [], []

        def compute(a, op, b, lead):
            expr = f"{a}{op}{b}"
            value = eval(expr, {"__builtins__": {}}, {})  # exact: the operands are chosen to keep integers
            value = int(value)
            solution.append(f"{lead} {expr} = <<{expr}={calculator_output(expr)}>>{value} {item}.")
            return value

        if "*" in self.ops and rng.random() < 0.3:  # a product as the opening step
            a, b = rng.randint(2, self.max_factor), rng.randint(2, self.max_number)
            question.append(f"{name} has {a} bags with {b} {item} in each bag.")
            value = compute(a, "*", b, f"{a} bags of {b} make")
            steps -= 1
        else:
            value = rng.randint(1, self.max_number)
            question.append(f"{name} has {value} {item}.")

        for _ in range(steps):
            divisors = [k for k in range(2, self.max_factor + 1) if value % k == 0]
            valid = [op for op in self.ops if not (op == "-" and value == 0) and not (op == "/" and not divisors)]
            op = rng.choice(valid)
            if op == "+":
                b, (q, lead) = rng.randint(1, self.max_number), rng.choice(ADD)
            elif op == "-":
                b, (q, lead) = rng.randint(1, min(value, self.max_number)), rng.choice(SUB)
            elif op == "*":
                b, (q, lead) = rng.randint(2, self.max_factor), rng.choice(MUL)
            else:
                b, (q, lead) = rng.choice(divisors), rng.choice(DIV)
            question.append(q.format(n=name, x=item, b=b))
            value = compute(value, op, b, lead.format(n=name, x=item, b=b))

        when = "in total" if len(question) == 1 and solution else "now"  # a lone product step: no "now"
        question.append(f"How many {item} does {name} have {when}?")
        answer = "\n".join(solution) + f"\n#### {value}"
        messages = [
            {"role": "user", "content": " ".join(question)},
            {"role": "assistant", "content": answer_to_parts(answer)},
        ]
        return {"messages": messages, "answer": value}

    def evaluate(self, conversation, assistant_response):
        return grade_final_answer(conversation, assistant_response)

    def reward(self, conversation, assistant_response):
        return float(self.evaluate(conversation, assistant_response))


if __name__ == "__main__":
    task = Arithmetic(max_steps=4)
    for i in range(5):
        ex = task[i]
        print("=" * 80)
        print(ex["messages"][0]["content"])
        print("-" * 80)
        print("".join(f"<<{p['text']}=" if p["type"] == "python" else f"{p['text']}>>" if p["type"] == "python_output"
                      else p["text"] for p in ex["messages"][1]["content"]))
