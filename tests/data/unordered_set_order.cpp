// prints iteration order of std::unordered_set<int> built like llama_batch_ext::token.seq_ids
#include <unordered_set>
#include <vector>
#include <cstdio>
#include <cstdlib>
struct token { int id = -1; std::unordered_set<int> seq_ids; };
int main() {
    // read lines: n a1 .. an ; output iteration order
    int n;
    std::vector<token> toks;
    while (scanf("%d", &n) == 1) {
        token t;
        for (int i = 0; i < n; ++i) { int v; scanf("%d", &v); t.seq_ids.insert(v); }
        toks.push_back(t);
    }
    for (auto & t : toks) {
        printf("%zu", t.seq_ids.size());
        for (int s : t.seq_ids) printf(" %d", s);
        printf("\n");
    }
}
