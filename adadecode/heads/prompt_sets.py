"""Built-in prompt sets for training heads (no network): a code set and a general set.

Both are composed deterministically from templates x topics by `build()` and shipped as
adadecode/heads/shipped/prompts_code.json and adadecode/heads/shipped/prompts_general.json (lists of strings,
user messages meant for the chat template). `load_prompts('code'|'general'|PATH)` reads them back; a PATH is
a JSON list of strings or a text file with one prompt per line.

Regenerate the shipped files with `python -m adadecode.heads.prompt_sets`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "shipped"

CODE_TASKS = [
    "reverses a string", "checks whether a string is a palindrome", "returns the factorial of n",
    "returns the n-th Fibonacci number", "checks whether a number is prime", "returns all primes below n",
    "counts the vowels in a string", "removes duplicates from a list while keeping the order",
    "returns the largest element of a list", "merges two sorted lists into one sorted list",
    "computes the greatest common divisor of two integers", "computes the least common multiple of two integers",
    "flattens a nested list", "counts how many times each word appears in a text",
    "converts a temperature from Celsius to Fahrenheit", "sorts a list of dictionaries by a given key",
    "checks whether two strings are anagrams", "returns the sum of the digits of an integer",
    "finds the second largest number in a list", "implements binary search on a sorted list",
    "implements bubble sort", "implements quicksort", "implements merge sort", "implements insertion sort",
    "transposes a matrix given as a list of lists", "multiplies two matrices",
    "converts a decimal number to binary", "converts a binary string to an integer",
    "capitalizes the first letter of every word in a sentence", "returns the longest word in a sentence",
    "checks whether a year is a leap year", "computes the average of a list of numbers",
    "returns the median of a list of numbers", "rotates a list by k positions",
    "checks whether a list is sorted", "splits a list into chunks of size n",
    "returns the intersection of two lists", "returns the union of two lists without duplicates",
    "counts the number of lines in a text file", "reads a CSV file and returns its rows as dictionaries",
    "writes a list of dictionaries to a JSON file", "validates an email address with a regular expression",
    "returns the number of days between two dates", "generates a random password of a given length",
    "computes the power set of a list", "returns all permutations of a string",
    "finds the longest common prefix of a list of strings", "checks whether parentheses in a string are balanced",
    "converts a Roman numeral to an integer", "converts an integer to a Roman numeral",
    "computes the dot product of two vectors", "normalizes a list of numbers to the range 0 to 1",
    "returns the first non-repeating character of a string", "compresses a string with run-length encoding",
    "decodes a run-length encoded string", "finds the missing number in a list containing 1 to n",
    "returns the indices of two numbers that add up to a target", "computes the moving average of a list",
    "counts the number of set bits in an integer", "checks whether a number is a power of two",
    "returns the Collatz sequence starting from n", "computes the area of a circle given its radius",
    "implements a stack with push, pop and peek", "implements a queue using two stacks",
    "implements a singly linked list with insert and delete", "reverses a linked list",
    "finds the maximum depth of a binary tree", "performs an in-order traversal of a binary tree",
    "inserts a value into a binary search tree", "performs a breadth-first search on a graph",
    "performs a depth-first search on a graph", "finds the shortest path in an unweighted graph",
    "implements Dijkstra's algorithm", "detects a cycle in a directed graph",
    "computes the edit distance between two strings", "computes the longest increasing subsequence",
    "solves the 0/1 knapsack problem with dynamic programming", "counts the ways to climb n stairs taking 1 or 2 steps",
    "finds the maximum subarray sum", "returns the k most frequent elements of a list",
    "groups a list of words by their anagrams", "implements a simple LRU cache",
    "parses a query string into a dictionary", "removes all whitespace from a string",
    "converts a snake_case string to camelCase", "converts a camelCase string to snake_case",
    "truncates a string to a maximum length and adds an ellipsis", "pads a number with leading zeros",
    "checks whether a string contains only digits", "returns the n largest values of a dictionary",
    "inverts a dictionary", "deep-merges two dictionaries", "retries a function call up to n times",
    "measures how long a function takes to run", "memoizes the results of a function",
    "downloads nothing but validates a URL string", "computes the checksum of a file with SHA-256",
    "lists all files with a given extension in a directory", "computes the Hamming distance of two strings",
    "finds all pairs in a list whose sum is zero", "returns the mode of a list",
    "computes the standard deviation of a list", "clamps a value between a minimum and a maximum",
    "interleaves two lists", "zips two lists into a dictionary", "formats a number of bytes as KB, MB or GB",
    "checks whether a Sudoku row is valid", "prints a multiplication table", "prints FizzBuzz from 1 to n",
    "counts the uppercase and lowercase letters in a string", "finds the longest palindromic substring",
]

CODE_TEMPLATES = [
    "Write a Python function that {task}.",
    "Write a JavaScript function that {task}.",
    "Write a short Python function that {task}, with a docstring and an example.",
    "Implement a function in C that {task}.",
]

GENERAL_TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "climate change",
    "the immune system", "inflation", "the Internet", "vaccines", "volcanoes", "the Roman Empire",
    "renewable energy", "machine learning", "the stock market", "plate tectonics", "the human heart",
    "democracy", "the Renaissance", "sleep", "coffee", "honeybees", "the Moon", "earthquakes",
    "electric cars", "recycling", "the printing press", "meditation", "the Great Wall of China",
    "rainforests", "the theory of evolution", "gravity", "the solar system", "DNA", "antibiotics",
    "the Olympic Games", "jazz music", "the Industrial Revolution", "ocean tides", "bread baking",
    "public libraries", "time management", "learning a new language", "healthy eating", "running",
    "urban gardening", "the history of chess", "dinosaurs", "the Amazon river", "hurricanes",
    "credit scores", "budgeting", "remote work", "social media", "the scientific method",
    "the Pyramids of Giza", "solar panels", "wind turbines", "nuclear energy", "the printing of money",
    "supply and demand", "the blockchain", "3D printing", "the moon landing", "Shakespeare",
    "impressionist painting", "classical music", "the human brain", "memory", "stress",
    "friendship", "volunteering", "composting", "bird migration", "coral reefs", "glaciers",
    "deserts", "the Silk Road", "ancient Greece", "the Cold War", "the United Nations",
    "photography", "cooking pasta", "tea", "chocolate", "the camera obscura", "telescopes",
    "airplanes", "trains", "bicycles", "public transport", "smartphones", "password security",
    "email etiquette", "job interviews", "writing a resume", "public speaking", "negotiation",
    "leadership", "teamwork", "critical thinking", "creativity", "habits", "exercise",
    "yoga", "hydration", "the common cold", "allergies", "first aid", "dogs as pets", "cats",
    "houseplants", "the seasons", "rainbows", "lightning", "snowflakes", "the speed of light",
    "magnets", "batteries", "the periodic table", "water purification", "soil erosion",
]

GENERAL_TEMPLATES = [
    "Explain {topic} in simple terms.",
    "Write a short paragraph about {topic}.",
    "What are three interesting facts about {topic}?",
    "Give me a brief overview of {topic} for a high school student.",
]


def build() -> dict[str, list[str]]:
    code = [t.format(task=task) for task in CODE_TASKS for t in CODE_TEMPLATES]
    general = [t.format(topic=topic) for topic in GENERAL_TOPICS for t in GENERAL_TEMPLATES]
    rng = random.Random(0)
    rng.shuffle(code)
    rng.shuffle(general)
    return {"code": code, "general": general}


def load_prompts(spec: str) -> list[str]:
    """'code' or 'general' (the shipped sets), or a file: a JSON list of strings or one prompt per line."""
    if spec in ("code", "general"):
        path = DATA / f"prompts_{spec}.json"
    else:
        path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file (give 'code', 'general', a JSON list or a text file)")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


if __name__ == "__main__":
    from ..model.filesys import write_atomic

    for name, prompts in build().items():
        write_atomic(DATA / f"prompts_{name}.json", json.dumps(prompts, indent=0) + "\n")
        print(name, len(prompts))
