"""Coding tasks in HumanEval's style, written for qwenjax's quality checks (`launch.bench.pass_rate`): each asks
for one Python function by its signature and behaviour, and holds hidden assertions that a correct function
passes. Each task also carries a hand-written solution: the tests hold every task's assertions to it (and hold a
wrong one to failing them), so a task whose tests are wrong cannot count against a model.

The tasks are this project's own: everyday functions (strings, lists, numbers, parsing, small algorithms), worded
so that one reading decides every tested case; corner cases the wording leaves open are not tested.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Task:
  name: str  # the function asked for
  prompt: str  # the user's message
  tests: str  # Python statements run after the answer's code: assertions calling `name`
  solution: str  # a correct answer's code (the tests check the tests with it)


def _task(signature: str, behaviour: str, tests: str, solution: str) -> Task:
  name = signature.split("(", 1)[0]
  prompt = (f"Write a Python function `{signature}` that {behaviour} Reply with the complete function in one "
            "```python code block.")
  return Task(name, prompt, tests.strip() + "\n", solution.strip() + "\n")


TASKS: tuple[Task, ...] = (
    _task("is_palindrome(s: str) -> bool",
          "returns True when s reads the same forwards and backwards, ignoring letter case and every character that "
          "is not a letter or a digit.",
          """
assert is_palindrome("A man, a plan, a canal: Panama")
assert not is_palindrome("race a car")
assert is_palindrome("")
assert is_palindrome("No 'x' in Nixon")
assert not is_palindrome("ab")
""", """
def is_palindrome(s):
    t = [c.lower() for c in s if c.isalnum()]
    return t == t[::-1]
"""),
    _task("fizzbuzz(n: int) -> list[str]",
          "returns the strings for 1 to n: 'Fizz' for multiples of 3, 'Buzz' for multiples of 5, 'FizzBuzz' for "
          "multiples of both, and the number itself otherwise.",
          """
assert fizzbuzz(5) == ["1", "2", "Fizz", "4", "Buzz"]
assert fizzbuzz(15)[-1] == "FizzBuzz"
assert fizzbuzz(0) == []
assert len(fizzbuzz(100)) == 100 and fizzbuzz(100)[89] == "FizzBuzz"
""", """
def fizzbuzz(n):
    return ["FizzBuzz" if i % 15 == 0 else "Fizz" if i % 3 == 0 else "Buzz" if i % 5 == 0 else str(i)
            for i in range(1, n + 1)]
"""),
    _task("count_vowels(s: str) -> int",
          "counts the vowels a, e, i, o and u in s, upper or lower case.",
          """
assert count_vowels("Hello World") == 3
assert count_vowels("AEIOU aeiou") == 10
assert count_vowels("rhythm") == 0
assert count_vowels("") == 0
""", """
def count_vowels(s):
    return sum(c in "aeiou" for c in s.lower())
"""),
    _task("flatten(nested: list) -> list",
          "returns the items of a list whose items may be lists nested to any depth, flattened into one list in "
          "order.",
          """
assert flatten([1, [2, [3, [4]], 5], [], 6]) == [1, 2, 3, 4, 5, 6]
assert flatten([]) == []
assert flatten([[[]]]) == []
assert flatten(["a", ["b", ["c"]]]) == ["a", "b", "c"]
""", """
def flatten(nested):
    out = []
    for x in nested:
        out.extend(flatten(x) if isinstance(x, list) else [x])
    return out
"""),
    _task("is_prime(n: int) -> bool",
          "returns True when the integer n is a prime number (so False for every n below 2).",
          """
assert [n for n in range(-5, 30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
assert is_prime(7919)
assert not is_prime(7917)
assert not is_prime(1_000_000)
""", """
def is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True
"""),
    _task("fibonacci(n: int) -> int",
          "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1; it must return "
          "fibonacci(200) at once.",
          """
assert [fibonacci(i) for i in range(10)] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
assert fibonacci(200) == 280571172992510140037611932413038677189525
""", """
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
"""),
    _task("reverse_words(s: str) -> str",
          "returns the words of s (separated by any whitespace) in reverse order, joined by single spaces.",
          """
assert reverse_words("the sky is blue") == "blue is sky the"
assert reverse_words("  hello   world  ") == "world hello"
assert reverse_words("") == ""
assert reverse_words("one") == "one"
""", """
def reverse_words(s):
    return " ".join(reversed(s.split()))
"""),
    _task("gcd(a: int, b: int) -> int",
          "returns the greatest common divisor of two non-negative integers, with gcd(0, 0) == 0, without using "
          "the math module.",
          """
assert gcd(12, 18) == 6
assert gcd(17, 5) == 1
assert gcd(0, 9) == 9
assert gcd(0, 0) == 0
assert gcd(2**40, 6**20) == 2**20
""", """
def gcd(a, b):
    while b:
        a, b = b, a % b
    return a
"""),
    _task("are_anagrams(a: str, b: str) -> bool",
          "returns True when the two strings use the same letters the same number of times, ignoring spaces and "
          "letter case.",
          """
assert are_anagrams("Listen", "Silent")
assert are_anagrams("Dormitory", "dirty room")
assert not are_anagrams("hello", "world")
assert not are_anagrams("aab", "abb")
""", """
def are_anagrams(a, b):
    norm = lambda s: sorted(s.replace(" ", "").lower())
    return norm(a) == norm(b)
"""),
    _task("second_largest(nums: list[int]) -> int | None",
          "returns the second largest distinct value in nums, or None when nums holds fewer than two distinct "
          "values.",
          """
assert second_largest([3, 1, 4, 1, 5, 9, 2, 6]) == 6
assert second_largest([5, 5, 5]) is None
assert second_largest([]) is None
assert second_largest([2, 1]) == 1
assert second_largest([-3, -1, -2]) == -2
assert second_largest([7, 7, 3]) == 3
""", """
def second_largest(nums):
    values = sorted(set(nums))
    return values[-2] if len(values) >= 2 else None
"""),
    _task("run_length_encode(s: str) -> str",
          "encodes each run of one repeated character as the character followed by the run's length, so 'aaabcc' "
          "becomes 'a3b1c2'.",
          """
assert run_length_encode("aaabcc") == "a3b1c2"
assert run_length_encode("") == ""
assert run_length_encode("abc") == "a1b1c1"
assert run_length_encode("zzzzzzzzzzzz") == "z12"
assert run_length_encode("aabaa") == "a2b1a2"
""", """
def run_length_encode(s):
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out.append(f"{s[i]}{j - i}")
        i = j
    return "".join(out)
"""),
    _task("merge_sorted(a: list[int], b: list[int]) -> list[int]",
          "merges two lists that are each sorted in ascending order into one ascending list, keeping duplicates.",
          """
assert merge_sorted([1, 3, 5], [2, 4, 6]) == [1, 2, 3, 4, 5, 6]
assert merge_sorted([], [1, 2]) == [1, 2]
assert merge_sorted([1, 1], [1]) == [1, 1, 1]
assert merge_sorted([-5, 0, 10], [-6, 11]) == [-6, -5, 0, 10, 11]
""", """
def merge_sorted(a, b):
    return sorted(a + b)
"""),
    _task("binary_search(items: list[int], target: int) -> int",
          "returns the index of target in the ascending list items of distinct integers, or -1 when it is absent.",
          """
items = list(range(0, 1000, 3))
assert all(binary_search(items, v) == i for i, v in enumerate(items))
assert binary_search(items, 1) == -1
assert binary_search(items, 1000) == -1
assert binary_search([], 3) == -1
""", """
def binary_search(items, target):
    lo, hi = 0, len(items) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if items[mid] == target:
            return mid
        if items[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1
"""),
    _task("word_frequencies(text: str) -> dict[str, int]",
          "counts the words of text, where a word is a maximal run of ASCII letters, lower-cased: it returns a "
          "dict from each word to its count.",
          """
assert word_frequencies("The cat and the hat.") == {"the": 2, "cat": 1, "and": 1, "hat": 1}
assert word_frequencies("") == {}
assert word_frequencies("Hi! hi? HI...") == {"hi": 3}
assert word_frequencies("a1b c-d") == {"a": 1, "b": 1, "c": 1, "d": 1}
""", """
import re
def word_frequencies(text):
    out = {}
    for w in re.findall(r"[A-Za-z]+", text):
        out[w.lower()] = out.get(w.lower(), 0) + 1
    return out
"""),
    _task("transpose(matrix: list[list[int]]) -> list[list[int]]",
          "returns the transpose of a rectangular matrix given as a list of rows (an empty matrix gives []).",
          """
assert transpose([[1, 2, 3], [4, 5, 6]]) == [[1, 4], [2, 5], [3, 6]]
assert transpose([[1]]) == [[1]]
assert transpose([]) == []
assert transpose([[1, 2]]) == [[1], [2]]
""", """
def transpose(matrix):
    return [list(col) for col in zip(*matrix)]
"""),
    _task("roman_to_int(s: str) -> int",
          "converts a valid Roman numeral (I, V, X, L, C, D, M, with subtractive pairs such as IV and CM) to an "
          "integer.",
          """
assert roman_to_int("III") == 3
assert roman_to_int("LVIII") == 58
assert roman_to_int("MCMXCIV") == 1994
assert roman_to_int("MMMCMXCIX") == 3999
assert roman_to_int("XLIV") == 44
""", """
def roman_to_int(s):
    v = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
    total = 0
    for i, c in enumerate(s):
        total += -v[c] if i + 1 < len(s) and v[s[i + 1]] > v[c] else v[c]
    return total
"""),
    _task("int_to_roman(n: int) -> str",
          "converts an integer from 1 to 3999 to its standard Roman numeral, using subtractive pairs (IV, IX, XL, "
          "XC, CD, CM).",
          """
assert int_to_roman(3) == "III"
assert int_to_roman(58) == "LVIII"
assert int_to_roman(1994) == "MCMXCIV"
assert int_to_roman(3999) == "MMMCMXCIX"
assert int_to_roman(444) == "CDXLIV"
""", """
def int_to_roman(n):
    out = []
    for value, sym in ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
                       (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while n >= value:
            out.append(sym)
            n -= value
    return "".join(out)
"""),
    _task("is_balanced(s: str) -> bool",
          "returns True when the brackets (), [] and {} in s are balanced and properly nested; other characters "
          "are ignored.",
          """
assert is_balanced("([]{})")
assert is_balanced("a(b[c]d)e")
assert not is_balanced("(]")
assert not is_balanced("([)]")
assert not is_balanced("((")
assert not is_balanced("}")
assert is_balanced("")
""", """
def is_balanced(s):
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for c in s:
        if c in "([{":
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return False
    return not stack
"""),
    _task("chunk(items: list, size: int) -> list[list]",
          "splits items into consecutive lists of `size` items (size is at least 1); the last list may be "
          "shorter.",
          """
assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
assert chunk([], 3) == []
assert chunk([1, 2, 3], 3) == [[1, 2, 3]]
assert chunk([1, 2, 3], 1) == [[1], [2], [3]]
""", """
def chunk(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]
"""),
    _task("unique_in_order(items: list) -> list",
          "returns the items of the list without repeats, each value kept at its first occurrence, in the "
          "original order.",
          """
assert unique_in_order([3, 1, 3, 2, 1]) == [3, 1, 2]
assert unique_in_order([]) == []
assert unique_in_order(["b", "a", "b"]) == ["b", "a"]
""", """
def unique_in_order(items):
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out
"""),
    _task("max_subarray_sum(nums: list[int]) -> int",
          "returns the largest sum of a non-empty run of consecutive items of the non-empty list nums.",
          """
assert max_subarray_sum([-2, 1, -3, 4, -1, 2, 1, -5, 4]) == 6
assert max_subarray_sum([-3, -1, -2]) == -1
assert max_subarray_sum([5]) == 5
assert max_subarray_sum([1, 2, 3]) == 6
""", """
def max_subarray_sum(nums):
    best = cur = nums[0]
    for x in nums[1:]:
        cur = max(x, cur + x)
        best = max(best, cur)
    return best
"""),
    _task("digit_sum(n: int) -> int",
          "returns the sum of the decimal digits of the integer n (of its absolute value when n is negative).",
          """
assert digit_sum(12345) == 15
assert digit_sum(-907) == 16
assert digit_sum(0) == 0
assert digit_sum(10**30) == 1
""", """
def digit_sum(n):
    return sum(int(c) for c in str(abs(n)))
"""),
    _task("caesar_cipher(text: str, shift: int) -> str",
          "shifts every ASCII letter of text by `shift` places in the alphabet (wrapping around, shift may be "
          "negative or larger than 26), keeping its case; other characters are unchanged.",
          """
assert caesar_cipher("Hello, World!", 3) == "Khoor, Zruog!"
assert caesar_cipher("xyz", 3) == "abc"
assert caesar_cipher("abc", -1) == "zab"
assert caesar_cipher("Zz", 52) == "Zz"
assert caesar_cipher("Attack at dawn", 13) == "Nggnpx ng qnja"
""", """
def caesar_cipher(text, shift):
    out = []
    for c in text:
        if "a" <= c <= "z":
            out.append(chr((ord(c) - 97 + shift) % 26 + 97))
        elif "A" <= c <= "Z":
            out.append(chr((ord(c) - 65 + shift) % 26 + 65))
        else:
            out.append(c)
    return "".join(out)
"""),
    _task("camel_to_snake(name: str) -> str",
          "converts a camelCase or PascalCase identifier made of letters only, whose words each start with one "
          "capital letter followed by lower-case letters, to snake_case in lower case.",
          """
assert camel_to_snake("camelCaseString") == "camel_case_string"
assert camel_to_snake("PascalCase") == "pascal_case"
assert camel_to_snake("word") == "word"
assert camel_to_snake("getUserById") == "get_user_by_id"
""", """
def camel_to_snake(name):
    out = []
    for i, c in enumerate(name):
        if c.isupper() and i > 0:
            out.append("_")
        out.append(c.lower())
    return "".join(out)
"""),
    _task("count_islands(grid: list[str]) -> int",
          "counts the islands of a grid given as equal-length strings of '1' (land) and '0' (water), where an "
          "island is a group of land cells joined up, down, left or right.",
          """
assert count_islands(["11000", "11000", "00100", "00011"]) == 3
assert count_islands(["111", "010", "111"]) == 1
assert count_islands(["000"]) == 0
assert count_islands([]) == 0
assert count_islands(["101", "010", "101"]) == 5
""", """
def count_islands(grid):
    seen, count = set(), 0
    for r in range(len(grid)):
        for c in range(len(grid[0])):
            if grid[r][c] == "1" and (r, c) not in seen:
                count += 1
                stack = [(r, c)]
                seen.add((r, c))
                while stack:
                    y, x = stack.pop()
                    for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= ny < len(grid) and 0 <= nx < len(grid[0]) and grid[ny][nx] == "1" \\
                                and (ny, nx) not in seen:
                            seen.add((ny, nx))
                            stack.append((ny, nx))
    return count
"""),
    _task("matrix_multiply(a: list[list[int]], b: list[list[int]]) -> list[list[int]]",
          "returns the matrix product of a (n by m) and b (m by p), matrices given as lists of rows, without "
          "numpy.",
          """
assert matrix_multiply([[1, 2], [3, 4]], [[5, 6], [7, 8]]) == [[19, 22], [43, 50]]
assert matrix_multiply([[1, 2, 3]], [[1], [2], [3]]) == [[14]]
assert matrix_multiply([[2]], [[3, 4]]) == [[6, 8]]
""", """
def matrix_multiply(a, b):
    return [[sum(x * y for x, y in zip(row, col)) for col in zip(*b)] for row in a]
"""),
    _task("primes_up_to(n: int) -> list[int]",
          "returns every prime number less than or equal to n, in ascending order.",
          """
assert primes_up_to(30) == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
assert primes_up_to(1) == []
assert primes_up_to(2) == [2]
assert len(primes_up_to(100_000)) == 9592
""", """
def primes_up_to(n):
    if n < 2:
        return []
    sieve = [True] * (n + 1)
    sieve[0] = sieve[1] = False
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = [False] * len(sieve[i * i::i])
    return [i for i, p in enumerate(sieve) if p]
"""),
    _task("longest_common_prefix(strings: list[str]) -> str",
          "returns the longest string that every string in the list starts with ('' for an empty list).",
          """
assert longest_common_prefix(["flower", "flow", "flight"]) == "fl"
assert longest_common_prefix(["dog", "racecar", "car"]) == ""
assert longest_common_prefix([]) == ""
assert longest_common_prefix(["same", "same"]) == "same"
assert longest_common_prefix(["a"]) == "a"
""", """
def longest_common_prefix(strings):
    if not strings:
        return ""
    prefix = strings[0]
    for s in strings[1:]:
        while not s.startswith(prefix):
            prefix = prefix[:-1]
    return prefix
"""),
    _task("rotate_right(items: list, k: int) -> list",
          "returns the list rotated k places to the right (k >= 0, possibly larger than the list's length), so "
          "rotate_right([1, 2, 3, 4], 1) == [4, 1, 2, 3].",
          """
assert rotate_right([1, 2, 3, 4], 1) == [4, 1, 2, 3]
assert rotate_right([1, 2, 3, 4], 6) == [3, 4, 1, 2]
assert rotate_right([], 5) == []
assert rotate_right([1, 2], 0) == [1, 2]
""", """
def rotate_right(items, k):
    if not items:
        return []
    k %= len(items)
    return items[-k:] + items[:-k] if k else list(items)
"""),
    _task("median(nums: list[float]) -> float",
          "returns the median of a non-empty list of numbers (the mean of the two middle values when the count "
          "is even), without the statistics module.",
          """
assert median([3, 1, 2]) == 2
assert median([4, 1, 3, 2]) == 2.5
assert median([7]) == 7
assert median([-1.5, 2.5]) == 0.5
""", """
def median(nums):
    s = sorted(nums)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
"""),
    _task("is_leap_year(year: int) -> bool",
          "returns True for leap years of the Gregorian calendar.",
          """
assert is_leap_year(2024) and is_leap_year(2000) and is_leap_year(1600)
assert not is_leap_year(1900) and not is_leap_year(2023) and not is_leap_year(2100)
""", """
def is_leap_year(year):
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
"""),
    _task("power_set(items: list) -> list[list]",
          "returns every subset of the list of distinct items, each subset as a list keeping the items' original "
          "order; the subsets may come in any order.",
          """
assert sorted(power_set([1, 2, 3])) == [[], [1], [1, 2], [1, 2, 3], [1, 3], [2], [2, 3], [3]]
assert power_set([]) == [[]]
assert len(power_set(list(range(10)))) == 1024
""", """
def power_set(items):
    out = [[]]
    for x in items:
        out += [s + [x] for s in out]
    return out
"""),
    _task("is_valid_ipv4(s: str) -> bool",
          "returns True when s is a dotted IPv4 address: exactly four decimal numbers from 0 to 255 separated by "
          "dots, digits only, and no leading zeros (except the number 0 itself).",
          """
assert is_valid_ipv4("192.168.0.1")
assert is_valid_ipv4("0.0.0.0") and is_valid_ipv4("255.255.255.255")
assert not is_valid_ipv4("256.1.1.1")
assert not is_valid_ipv4("1.2.3")
assert not is_valid_ipv4("01.2.3.4")
assert not is_valid_ipv4("1.2.3.4.5")
assert not is_valid_ipv4("a.b.c.d")
assert not is_valid_ipv4("1.2..4")
""", """
def is_valid_ipv4(s):
    parts = s.split(".")
    if len(parts) != 4:
        return False
    for p in parts:
        if not p.isdigit() or not p.isascii() or (len(p) > 1 and p[0] == "0") or int(p) > 255:
            return False
    return True
"""),
    _task("two_sum(nums: list[int], target: int) -> tuple[int, int] | None",
          "returns a pair of indices (i, j) with i < j and nums[i] + nums[j] == target, or None when there is no "
          "such pair.",
          """
r = two_sum([2, 7, 11, 15], 9)
assert r is not None and r[0] < r[1] and [2, 7, 11, 15][r[0]] + [2, 7, 11, 15][r[1]] == 9
r = two_sum([3, 3], 6)
assert r is not None and tuple(r) == (0, 1)
assert two_sum([1, 2, 3], 7) is None
assert two_sum([], 1) is None
""", """
def two_sum(nums, target):
    seen = {}
    for j, x in enumerate(nums):
        if target - x in seen:
            return (seen[target - x], j)
        seen.setdefault(x, j)
    return None
"""),
    _task("group_by_length(words: list[str]) -> dict[int, list[str]]",
          "returns a dict from each word length to the words of that length, in their input order.",
          """
assert group_by_length(["a", "bb", "c", "ddd", "ee"]) == {1: ["a", "c"], 2: ["bb", "ee"], 3: ["ddd"]}
assert group_by_length([]) == {}
""", """
def group_by_length(words):
    out = {}
    for w in words:
        out.setdefault(len(w), []).append(w)
    return out
"""),
    _task("moving_average(nums: list[float], k: int) -> list[float]",
          "returns the mean of every window of k consecutive numbers of nums, in order (1 <= k; no window when k "
          "exceeds the list's length).",
          """
assert moving_average([1, 2, 3, 4, 5], 2) == [1.5, 2.5, 3.5, 4.5]
assert moving_average([1, 2, 3], 3) == [2.0]
assert moving_average([1, 2], 3) == []
assert moving_average([4, 8], 1) == [4.0, 8.0]
""", """
def moving_average(nums, k):
    return [sum(nums[i:i + k]) / k for i in range(len(nums) - k + 1)]
"""),
    _task("to_binary(n: int) -> str",
          "returns the binary digits of the non-negative integer n, without a '0b' prefix ('0' for zero), without "
          "using bin() or format().",
          """
assert to_binary(0) == "0"
assert to_binary(5) == "101"
assert to_binary(1024) == "10000000000"
assert to_binary(255) == "11111111"
""", """
def to_binary(n):
    if n == 0:
        return "0"
    out = []
    while n:
        out.append(str(n % 2))
        n //= 2
    return "".join(reversed(out))
"""),
    _task("count_occurrences(s: str, sub: str) -> int",
          "counts the occurrences of the non-empty string sub in s, overlapping ones included, so 'aaa' holds "
          "'aa' twice.",
          """
assert count_occurrences("aaa", "aa") == 2
assert count_occurrences("abababa", "aba") == 3
assert count_occurrences("abc", "d") == 0
assert count_occurrences("", "a") == 0
""", """
def count_occurrences(s, sub):
    return sum(s.startswith(sub, i) for i in range(len(s)))
"""),
    _task("lcm_of_list(nums: list[int]) -> int",
          "returns the least common multiple of a non-empty list of positive integers.",
          """
assert lcm_of_list([4, 6]) == 12
assert lcm_of_list([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == 2520
assert lcm_of_list([7]) == 7
assert lcm_of_list([2**10, 3**5]) == 2**10 * 3**5
""", """
from math import gcd
def lcm_of_list(nums):
    out = 1
    for x in nums:
        out = out * x // gcd(out, x)
    return out
"""),
    _task("edit_distance(a: str, b: str) -> int",
          "returns the Levenshtein distance between a and b: the fewest single-character insertions, deletions "
          "and substitutions that turn a into b.",
          """
assert edit_distance("kitten", "sitting") == 3
assert edit_distance("", "abc") == 3
assert edit_distance("flaw", "lawn") == 2
assert edit_distance("same", "same") == 0
""", """
def edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
"""),
    _task("longest_increasing_subsequence(nums: list[int]) -> int",
          "returns the length of the longest strictly increasing subsequence of nums (not necessarily "
          "contiguous).",
          """
assert longest_increasing_subsequence([10, 9, 2, 5, 3, 7, 101, 18]) == 4
assert longest_increasing_subsequence([]) == 0
assert longest_increasing_subsequence([7, 7, 7]) == 1
assert longest_increasing_subsequence([0, 1, 0, 3, 2, 3]) == 4
""", """
def longest_increasing_subsequence(nums):
    best = [1] * len(nums)
    for i in range(len(nums)):
        for j in range(i):
            if nums[j] < nums[i]:
                best[i] = max(best[i], best[j] + 1)
    return max(best, default=0)
"""),
    _task("parse_duration(text: str) -> int",
          "converts a duration such as '1h30m15s' (hours 'h', minutes 'm' and seconds 's', each optional but in "
          "that order, each a whole number) to a number of seconds.",
          """
assert parse_duration("1h30m15s") == 5415
assert parse_duration("45s") == 45
assert parse_duration("2h") == 7200
assert parse_duration("10m5s") == 605
assert parse_duration("100m") == 6000
""", """
import re
def parse_duration(text):
    h, m, s = re.fullmatch(r"(?:(\\d+)h)?(?:(\\d+)m)?(?:(\\d+)s)?", text).groups()
    return int(h or 0) * 3600 + int(m or 0) * 60 + int(s or 0)
"""),
    _task("spiral_order(matrix: list[list[int]]) -> list[int]",
          "returns the items of a rectangular matrix (a list of rows) in clockwise spiral order, starting at the "
          "top-left corner.",
          """
assert spiral_order([[1, 2, 3], [4, 5, 6], [7, 8, 9]]) == [1, 2, 3, 6, 9, 8, 7, 4, 5]
assert spiral_order([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]) == [1, 2, 3, 4, 8, 12, 11, 10, 9, 5, 6, 7]
assert spiral_order([]) == []
assert spiral_order([[1], [2], [3]]) == [1, 2, 3]
""", """
def spiral_order(matrix):
    out = []
    m = [list(r) for r in matrix]
    while m:
        out += m.pop(0)
        m = [list(r) for r in zip(*m)][::-1]
    return out
"""),
    _task("title_case(s: str) -> str",
          "returns s with the first character of every space-separated word upper-cased and the rest of the word "
          "lower-cased; the spaces are kept as they are.",
          """
assert title_case("hello world") == "Hello World"
assert title_case("hELLO  wORLD") == "Hello  World"
assert title_case("") == ""
assert title_case("a") == "A"
""", """
def title_case(s):
    return " ".join(w[:1].upper() + w[1:].lower() for w in s.split(" "))
"""),
    _task("dict_depth(d: dict) -> int",
          "returns how deeply dicts nest in d: 1 for a dict whose values are not dicts (including an empty dict), "
          "plus one for each level of dict values inside.",
          """
assert dict_depth({}) == 1
assert dict_depth({"a": 1}) == 1
assert dict_depth({"a": {"b": {"c": 1}}, "d": 2}) == 3
assert dict_depth({"a": {}, "b": {"c": {}}}) == 3
""", """
def dict_depth(d):
    return 1 + max((dict_depth(v) for v in d.values() if isinstance(v, dict)), default=0)
"""),
)
