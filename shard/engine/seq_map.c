/* seq_map: the engine's sequences by id, for the lookups every step makes per row (validation,
 * the decode batch, the scheduler's reads of each row's result). A linear scan over the
 * sequences cost O(batch) a lookup and O(batch^2) a step, which at batch 256 was ~0.1 ms of host
 * time a step on this machine's CPU (perf: eng_find_seq), time the device then waits.
 *
 * Open addressing with linear probing over a power-of-two table kept at most half full;
 * deletion shifts the entries after the hole back (no tombstones). */
#include <string.h>

#include "base/mem.h"
#include "internal.h"

static uint64_t slot_of(int64_t id, int64_t mask)
{
    uint64_t z = (uint64_t)id + 0x9E3779B97F4A7C15ull; /* splitmix64's finaliser */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) & (uint64_t)mask;
}

static uc_status rehash(struct eng_seq_map *m, int64_t cap)
{
    struct seq **old = m->slots;
    int64_t old_cap = m->cap;
    struct seq **fresh = uc_calloc((size_t)cap, sizeof *fresh);
    if (!fresh) {
        return UC_ERRF(UC_ERR_NOMEM, "sequence map of %lld slots", (long long)cap);
    }
    m->slots = fresh;
    m->cap = cap;
    for (int64_t i = 0; i < old_cap; i++) {
        if (old[i]) {
            uint64_t j = slot_of(old[i]->id, cap - 1);
            while (fresh[j]) {
                j = (j + 1) & (uint64_t)(cap - 1);
            }
            fresh[j] = old[i];
        }
    }
    uc_free(old);
    return UC_OK;
}

uc_status eng_seq_map_put(struct eng_seq_map *m, struct seq *s)
{
    if (2 * (m->n + 1) > m->cap) {
        uc_status rc = rehash(m, m->cap ? 2 * m->cap : 64);
        if (rc != UC_OK) {
            return rc;
        }
    }
    uint64_t j = slot_of(s->id, m->cap - 1);
    while (m->slots[j]) {
        if (m->slots[j]->id == s->id) {
            return UC_ERRF(UC_ERR_INTERNAL, "sequence %lld mapped twice", (long long)s->id);
        }
        j = (j + 1) & (uint64_t)(m->cap - 1);
    }
    m->slots[j] = s;
    m->n++;
    return UC_OK;
}

struct seq *eng_seq_map_get(const struct eng_seq_map *m, int64_t id)
{
    if (m->n == 0) {
        return NULL;
    }
    for (uint64_t j = slot_of(id, m->cap - 1); m->slots[j]; j = (j + 1) & (uint64_t)(m->cap - 1)) {
        if (m->slots[j]->id == id) {
            return m->slots[j];
        }
    }
    return NULL;
}

struct seq *eng_seq_map_del(struct eng_seq_map *m, int64_t id)
{
    if (m->n == 0) {
        return NULL;
    }
    const uint64_t mask = (uint64_t)(m->cap - 1);
    uint64_t j = slot_of(id, (int64_t)mask);
    while (m->slots[j] && m->slots[j]->id != id) {
        j = (j + 1) & mask;
    }
    struct seq *gone = m->slots[j];
    if (!gone) {
        return NULL;
    }
    m->slots[j] = NULL;
    m->n--;
    /* the entries after the hole, up to the next empty slot, move back if the hole lies on
     * their probe path (between their home slot and where they sit) */
    for (uint64_t k = (j + 1) & mask; m->slots[k]; k = (k + 1) & mask) {
        uint64_t home = slot_of(m->slots[k]->id, (int64_t)mask);
        if (((k - home) & mask) >= ((k - j) & mask)) {
            m->slots[j] = m->slots[k];
            m->slots[k] = NULL;
            j = k;
        }
    }
    return gone;
}

void eng_seq_map_fini(struct eng_seq_map *m)
{
    uc_free(m->slots);
    memset(m, 0, sizeof *m);
}
