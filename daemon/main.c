/* uncompd entry point (placeholder until the scheduler lands). */
#include <stdio.h>

int main(void)
{
    fprintf(stderr, "uncompd: not built yet\n");
    return 1;
}
