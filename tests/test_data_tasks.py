"""What a task's splits can and cannot measure (`Task.data_warnings`)."""

from flax_transformer.data import EOS_ID, UNK_ID, Example, Task, Vocab
from flax_transformer.data.tasks import seen_in_training, unknown_text_warnings


def _example(src, tgt=(4,)):
    return Example([*src, EOS_ID], [*tgt, EOS_ID])


def test_unknown_text_is_warned_about_when_it_is_most_of_a_split():
    vocab = Vocab(["a", "b", "."])  # ids 4, 5, 6
    unknown, dot, known = [UNK_ID, UNK_ID], [UNK_ID, 6], [UNK_ID, 4]
    task = Task("t", vocab, vocab, train=[_example([4])],
                valid=[_example(unknown), _example(dot), _example(known)],  # 2 of 3
                test=[_example(unknown), _example([4, 5])])  # 1 of 2: not more than half
    assert unknown_text_warnings(task) == [
        "valid: 2 of its 3 sources are unknown to the tokenizer (nothing but <unk>, spaces and "
        "punctuation: another script or alphabet than the training text?), so its scores "
        "measure nothing the model could learn; check the valid data"]
    task.test = [_example([4], tgt=[UNK_ID])]  # the target side is looked at too
    assert unknown_text_warnings(task)[1].startswith("test: 1 of its 1 targets are unknown")
    task.valid = [_example([6])]  # punctuation alone is no unknown text
    assert len(unknown_text_warnings(task)) == 1


def test_seen_in_training_counts_every_example_of_the_split():
    assert seen_in_training("test", ["x y", "z"], ["x  y", "w"], "file t.tsv").startswith(
        "test (file t.tsv): 1 of its 2 sources also occur in the training split")
    assert seen_in_training("test", ["z", "z"], ["w"], "file t.tsv") is None


def test_a_training_split_unknown_to_a_reused_tokenizer_is_warned_about():
    vocab = Vocab(["a", "b"])
    task = Task("t", vocab, vocab, train=[_example([UNK_ID]), _example([UNK_ID]), _example([4])],
                valid=[_example([4])], test=[_example([5])])
    assert unknown_text_warnings(task) == [
        "train: 2 of its 3 sources are unknown to the tokenizer (nothing but <unk>, spaces and "
        "punctuation: a tokenizer reused from another run (--init-from) that never saw this "
        "script?), so the model cannot learn from them; check the train data"]
    assert task.data_warnings(("valid", "test")) == []  # scoring looks at what it scores
