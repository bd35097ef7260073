#include <stdio.h>
#include "version.h"

int main(void) {
    printf("hello from a declared source, version %s\n", HELLO_VERSION);
    return 0;
}
